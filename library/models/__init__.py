"""Model loading, saving and format conversion (LDM/SGM single files <-> diffusers/transformers)."""
