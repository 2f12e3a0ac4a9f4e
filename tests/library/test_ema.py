"""ParameterEMA against a hand-computed EMA; the warm-up schedule; EMA weights swapped in and restored bit-exactly;
state round trip through safetensors + JSON; bad --ema_decay values."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import FlagError, UserInputError
from library.train.ema import ParameterEMA, check_ema_decay, trainable_parameters


def small_net(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False)).to(dtype)
    return net


def random_step(net: torch.nn.Module, generator: torch.Generator) -> None:
    """Stand-in for an optimizer step: move every parameter by a random amount."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype))


def hand_ema(net: torch.nn.Module, steps: int, decays) -> dict[str, torch.Tensor]:
    """float64 EMA over `steps` random steps, with decays[k] the decay after step k + 1."""
    generator = torch.Generator().manual_seed(1)
    shadow = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    for k in range(steps):
        random_step(net, generator)
        for n, p in net.named_parameters():
            shadow[n] = decays[k] * shadow[n] + (1 - decays[k]) * p.detach().double()
    return shadow


@pytest.mark.parametrize("warmup", [False, True])
def test_update_matches_hand_computed_ema(warmup):
    decay = 0.9
    # warm-up: 0 after step 1 (copy), then min(decay, step / (9 + step)): 2/11, 3/12, 4/13, 5/14
    decays = [0.0, 2 / 11, 3 / 12, 4 / 13, 5 / 14] if warmup else [decay] * 5
    expected = hand_ema(small_net(), 5, decays)

    net = small_net()
    ema = ParameterEMA(trainable_parameters(net), decay=decay, warmup=warmup)
    generator = torch.Generator().manual_seed(1)
    used = []
    for step in range(1, 6):
        random_step(net, generator)
        used.append(ema.update(step))
    assert used == pytest.approx(decays)
    assert ema.step == 5
    for name, shadow in ema.tensors().items():
        assert shadow.dtype == torch.float32
        torch.testing.assert_close(shadow.double(), expected[name], rtol=1e-6, atol=1e-6)


def test_warmup_is_capped_by_decay():
    ema = ParameterEMA(trainable_parameters(small_net()), decay=0.99, warmup=True)
    assert ema.decay_at(1) == 0.0
    assert ema.decay_at(90) == pytest.approx(90 / 99)
    assert ema.decay_at(10_000) == 0.99


def test_cpu_shadows_are_separate_fp32_copies_of_bf16_params():
    net = small_net(torch.bfloat16)
    params = trainable_parameters(net)
    ema = ParameterEMA(params, decay=0.5, warmup=False, device="cpu")
    for name, p in params.items():
        shadow = ema.tensors()[name]
        assert shadow.dtype == torch.float32 and shadow.device.type == "cpu"
        assert shadow.data_ptr() != p.data_ptr()
        assert torch.equal(shadow, p.detach().float())
    before = {n: p.detach().clone() for n, p in params.items()}
    random_step(net, torch.Generator().manual_seed(2))
    ema.update(1)
    for name, p in params.items():  # halfway between the old and the new bf16 weights, computed in fp32
        expected = 0.5 * before[name].float() + 0.5 * p.detach().float()
        torch.testing.assert_close(ema.tensors()[name], expected)


def test_swapped_in_uses_ema_weights_and_restores_bit_exactly():
    net = small_net(torch.bfloat16)
    ema = ParameterEMA(trainable_parameters(net), decay=0.7, warmup=False)
    generator = torch.Generator().manual_seed(3)
    for step in range(1, 4):
        random_step(net, generator)
        ema.update(step)
    training = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped_in():
            for n, p in net.named_parameters():
                assert torch.equal(p, ema.tensors()[n].to(torch.bfloat16))
                assert not torch.equal(p, training[n])
            raise RuntimeError("inside")
    for n, p in net.named_parameters():
        assert torch.equal(p, training[n])
        assert p.requires_grad


def test_copy_to_rejects_other_parameters():
    ema = ParameterEMA(trainable_parameters(small_net()), decay=0.9)
    other = torch.nn.Linear(4, 5)
    with pytest.raises(UserInputError, match=r"'0\.weight' with shape \(5, 4\), expected \(3, 4\)"):
        ema.copy_to({"0.weight": other.weight, "0.bias": other.bias, "1.weight": other.weight})


def test_state_round_trip_through_safetensors_and_json_continues_exactly(tmp_path):
    def run(steps, ema, net, generator):
        for step in steps:
            random_step(net, generator)
            ema.update(step)

    net = small_net()
    whole = ParameterEMA(trainable_parameters(net), decay=0.95)
    run(range(1, 7), whole, net, torch.Generator().manual_seed(4))

    net = small_net()
    first = ParameterEMA(trainable_parameters(net), decay=0.95)
    generator = torch.Generator().manual_seed(4)
    run(range(1, 4), first, net, generator)
    save_file(first.tensors(), tmp_path / "ema.safetensors")
    (tmp_path / "ema.json").write_text(json.dumps(first.info()))

    resumed = ParameterEMA(trainable_parameters(net), decay=0.95)  # made from the live weights, then loaded
    changed = resumed.load(load_file(tmp_path / "ema.safetensors"), json.loads((tmp_path / "ema.json").read_text()))
    assert changed == [] and resumed.step == 3
    run(range(4, 7), resumed, net, generator)
    for name, shadow in whole.tensors().items():
        assert torch.equal(resumed.tensors()[name], shadow)

    again = ParameterEMA(trainable_parameters(net), decay=0.9, warmup=False)
    assert again.load_state_dict(first.state_dict()) == ["EMA decay: saved 0.95, now 0.9",
                                                          "EMA warmup: saved True, now False"]


def test_load_names_the_first_mismatch_and_changes_nothing():
    ema = ParameterEMA(trainable_parameters(small_net()), decay=0.9)
    original = {n: t.clone() for n, t in ema.tensors().items()}
    tensors, info = dict(ema.tensors()), ema.info()
    with pytest.raises(UserInputError, match="lack '0.bias'"):
        ema.load({k: v for k, v in tensors.items() if k != "0.bias"}, info)
    with pytest.raises(UserInputError, match=r"'1\.weight' with shape \(2, 4\), expected \(2, 3\)"):
        ema.load({**tensors, "0.weight": tensors["0.weight"] + 1, "1.weight": torch.zeros(2, 4)}, info)
    with pytest.raises(UserInputError, match="'2.weight', which the EMA does not track"):
        ema.load({**tensors, "2.weight": torch.zeros(1)}, info)
    with pytest.raises(UserInputError, match="step count"):
        ema.load(tensors, {**info, "step": -1})
    for n, t in ema.tensors().items():
        assert torch.equal(t, original[n])


def test_parameters_that_stop_requiring_grad_are_still_averaged():
    net = small_net()
    ema = ParameterEMA(trainable_parameters(net), decay=0.5, warmup=False)
    net[0].weight.requires_grad_(False)
    before = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(2.0)
    ema.update(1)
    assert set(ema.tensors()) == {"0.weight", "0.bias", "1.weight"}
    torch.testing.assert_close(ema.tensors()["0.weight"], before + 1.0)


def test_tracks_a_lora_style_network_only():
    class Lora(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_down = torch.nn.Linear(4, 2, bias=False)
            self.lora_up = torch.nn.Linear(2, 4, bias=False)
            torch.nn.init.zeros_(self.lora_up.weight)

    base, lora = torch.nn.Linear(4, 4).requires_grad_(False), Lora()
    ema = ParameterEMA(trainable_parameters(lora), decay=0.9)
    assert set(ema.tensors()) == {"lora_down.weight", "lora_up.weight"}
    assert trainable_parameters(base) == {}


@pytest.mark.parametrize("value", [0, 1, -0.1, 1.5, float("nan"), "abc"])
def test_bad_decay_is_a_one_line_flag_error(value):
    with pytest.raises(FlagError) as error:
        check_ema_decay(value)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"--ema_decay {value}:") and "between 0 and 1 (exclusive)" in message


def test_good_decay_is_returned_as_float():
    assert check_ema_decay("0.9999") == 0.9999
    assert check_ema_decay(0.5, flag="--x") == 0.5
