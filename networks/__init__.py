"""LoRA network modules loadable with --network_module (kohya layout): networks.lora and friends."""
