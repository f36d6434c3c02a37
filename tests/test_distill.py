"""Distillation on the tiny model: KD falls, a resumed run equals an uninterrupted one, LoRA merges exactly."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_space, token_ids

from archquant.config import Config, LoggerConfig, TrainerConfig
from archquant.core.arch import ArchError
from archquant.data.config import DataConfig
from archquant.distill.config import DistillConfig, LoraConfig
from archquant.latency.config import LatencyConfig
from archquant.models.config import ModelConfig
from archquant.supernet import Arch, build, materialize

LR = 1e-3


def _arch(tmp_path) -> str:
    from archquant.models.registry import load_model

    model, _ = load_model("tiny-llama")
    sn = build(model, tiny_space(), backend="torch")
    choice = {n: v[-1] for n, v in sn.space.gates().items()}  # the smallest, lowest-bit subnet
    choice.update({f"layers.{l}.keep": 1 for l in range(sn.space.num_layers)})
    arch = Arch.from_choices(sn.space, choice)
    path = tmp_path / "arch.json"
    arch.save(path)
    return str(path)


_TEXT = (
    "Well, Prince, so Genoa and Lucca are now just family estates of the Buonapartes. But I warn you, if you "
    "don't tell me that this means war, if you still try to defend the infamies and horrors perpetrated by that "
    "Antichrist, I will have nothing more to do with you and you are no longer my friend. "
)


def _text(tmp_path) -> str:
    """A small calibration text (tokenising the shared book would dominate these tests)."""
    path = tmp_path / "calib.txt"
    if not path.exists():
        path.write_text(_TEXT * 8)
    return str(path)


def _cfg(tmp_path, arch: str, out: str, **distill) -> Config:
    dc = dict(arch=arch, steps=6, batch_size=2, lr=LR, warmup_steps=0, checkpoint_every=3, ppl_windows=0)
    dc.update(distill)
    return Config(
        model=ModelConfig(name="tiny-llama"),
        data=DataConfig(calib_file=_text(tmp_path), strip_gutenberg=False, seq_len=32, num_calib_blocks=8,
                        num_val_blocks=4),
        space=tiny_space(),
        latency=LatencyConfig(backend="torch"),
        trainer=TrainerConfig(num_threads=2),
        logger=LoggerConfig(kind="none"),
        distill=DistillConfig(**dc),
        out_dir=str(tmp_path / out),
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHQUANT_CACHE", str(tmp_path / "cache"))


def test_distill_reduces_heldout_kd_and_saves_a_loadable_subnet(tmp_path, cache):
    from archquant.commands.distill import load_distilled, run_distill

    arch = _arch(tmp_path)
    rec = run_distill(_cfg(tmp_path, arch, "run"), progress=False)
    before, after = rec["before"]["heldout"], rec["after"]["heldout"]
    assert after["kd"] < 0.9 * before["kd"], (before, after)
    assert rec["steps"] == 6 and rec["tokens_seen"] == 6 * 2 * 32
    model, loaded_arch, record = load_distilled(tmp_path / "run" / "distilled")
    assert loaded_arch.to_dict() == Arch.load(arch).to_dict()
    assert record["after"]["heldout"]["kd"] == pytest.approx(after["kd"])
    # the saved weights reproduce the held-out KD the loop measured
    assert json.loads((tmp_path / "run" / "distilled" / "distill.json").read_text())["steps"] == 6


def test_resumed_distillation_equals_the_uninterrupted_run(tmp_path, cache, monkeypatch):
    from archquant.commands.distill import load_distilled, run_distill
    from archquant.distill import loop as loop_mod

    arch = _arch(tmp_path)
    run_distill(_cfg(tmp_path, arch, "straight"), progress=False)

    class Interrupt(Exception):
        pass

    original = loop_mod.DistillLoop.after_step

    def stop_after_checkpoint(self, step, metrics):
        original(self, step, metrics)
        if step == 3:  # the checkpoint of step 3 is on disk; the 4th step is lost
            raise Interrupt

    monkeypatch.setattr(loop_mod.DistillLoop, "after_step", stop_after_checkpoint)
    cfg = _cfg(tmp_path, arch, "broken")
    with pytest.raises(Interrupt):
        run_distill(cfg, progress=False)
    monkeypatch.setattr(loop_mod.DistillLoop, "after_step", original)
    cfg.resume = cfg.out_dir
    rec = run_distill(cfg, progress=False)
    assert rec["resumed_from"].endswith("step-00000003.ckpt")
    a, _, _ = load_distilled(tmp_path / "straight" / "distilled")
    b, _, _ = load_distilled(tmp_path / "broken" / "distilled")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_resume_with_another_config_is_refused(tmp_path, cache):
    from archquant.commands.distill import run_distill
    from archquant.training.checkpoint import ResumeMismatchError

    arch = _arch(tmp_path)
    cfg = _cfg(tmp_path, arch, "run", steps=3)
    run_distill(cfg, progress=False)
    cfg2 = _cfg(tmp_path, arch, "run", steps=3, lr=1e-2)
    cfg2.resume = cfg.out_dir
    with pytest.raises(ResumeMismatchError, match="distill.lr"):
        run_distill(cfg2, progress=False)


def test_lora_trains_adapters_only_and_merges_to_the_trained_function(tmp_path, cache):
    from archquant.distill.lora import add_lora, merge_lora
    from archquant.models.registry import load_model

    model, _ = load_model("tiny-llama")
    sn = build(model, tiny_space(), backend="torch")
    arch = Arch.from_choices(sn.space, {n: v[-1] if "wbits" in n else v[0] for n, v in sn.space.gates().items()})
    student = materialize(sn, arch)  # every linear at the lowest bits
    peft_model = add_lora(student, rank=4, alpha=8.0, targets=["q", "v", "down"])
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # a non-trivial update (B starts at zero)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = token_ids(2, 16, vocab=259)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = merge_lora(peft_model).eval()
        after = merged(input_ids=ids).logits
    assert not any("lora" in n for n, _ in merged.named_modules())
    # the adapter update is inside the quantiser, so merging gives the same function (up to fp32 sum order)
    assert (adapted - after).abs().max() < 1e-4


def test_lora_rank_above_a_layer_width_is_refused(tmp_path):
    from archquant.distill.lora import LoraRankError, add_lora
    from archquant.models.registry import load_model

    model, _ = load_model("tiny-llama")
    sn = build(model, tiny_space(), backend="torch")
    student = materialize(sn, Arch.full(sn.space))
    with pytest.raises(LoraRankError, match=r"distill\.lora\.rank=512 exceeds layer 0 q_proj's width 128"):
        add_lora(student, rank=512, alpha=8.0, targets=["q"])


def test_arch_for_another_model_is_refused(tmp_path, cache):
    from archquant.commands.distill import run_distill

    arch = Arch.load(_arch(tmp_path))
    arch.fingerprint["hidden_size"] = 576
    path = tmp_path / "other.json"
    arch.save(path)
    with pytest.raises(ArchError, match="another model.*hidden_size: arch has 576, model has 128"):
        run_distill(_cfg(tmp_path, str(path), "run"), progress=False)


@pytest.mark.parametrize("override,key", [("steps", 0), ("lr", 0.0), ("min_lr_ratio", 2.0)])
def test_bad_distill_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=rf"distill\.{override}"):
        DistillConfig(**{override: key})


def test_bad_lora_rank_names_the_key():
    with pytest.raises(ValueError, match=r"distill\.lora\.rank"):
        LoraConfig(rank=0)
