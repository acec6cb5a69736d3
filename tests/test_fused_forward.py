"""fd_decoder_forward (all layers in one native op) against the op-by-op path it replaces, on the
default model: same logits and the same KV cache contents for prefill, chunked prefill and a
mixed decode batch, in each weight precision."""
from __future__ import annotations

import numpy as np
import pytest

from fastdeploy.model_executor.layers import linear as L
from fastdeploy.model_executor.model_runner import ModelRunner
from fastdeploy.model_executor.models.fused_forward import FusedDecoderForward

BLOCK = 16


def run_both(runner: ModelRunner, steps: list[tuple[list[list[int]], list[int], list[list[int]]]]
             ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The same steps through the op-by-op path and through the fused op, each on fresh caches."""
    model = runner.model
    fused = model._fused_forward()
    if fused is None and L.linear_backend_name() != L.NATIVE:
        pytest.skip("the fused forward needs the native linear kernels, which this CPU cannot run")
    assert isinstance(fused, FusedDecoderForward), "the fused op should apply on the native CPU backend"
    outs = []
    for use_fused in (False, True):
        model._fused = fused if use_fused else None
        runner.init_kv_cache(num_blocks=64, block_size=BLOCK)
        for k, v in runner.kv_caches:  # allocated uninitialized; compared whole below
            k.fill_(0)
            v.fill_(0)
        logits = [runner.execute(chunks, starts, tables, list(np.cumsum([len(c) for c in chunks]) - 1))
                  for chunks, starts, tables in steps]
        caches = np.concatenate([np.stack([k.numpy(), v.numpy()]) for k, v in runner.kv_caches])
        outs.append((logits, caches))
    model._fused = fused
    (plain_logits, plain_cache), (fused_logits, fused_cache) = outs
    np.testing.assert_allclose(fused_cache, plain_cache, rtol=1e-5, atol=1e-5)
    return plain_logits, fused_logits


@pytest.mark.parametrize("quant", ["none", "wint8"])
def test_fused_forward_matches_op_by_op(default_model_path, quant):
    runner = ModelRunner(default_model_path, max_model_len=1024, quantization=quant)
    rng = np.random.default_rng(0)
    a = rng.integers(1, 40000, 70).tolist()
    b = rng.integers(1, 40000, 33).tolist()
    steps = [
        ([a[:40], b], [0, 0], [[0, 1, 2], [8, 9, 10]]),          # prefill of two sequences
        ([a[40:]], [40], [[0, 1, 2, 3, 4]]),                     # chunked prefill continues a
        ([[11], [12]], [70, 33], [[0, 1, 2, 3, 4], [8, 9, 10]]),  # decode batch of two
        ([[13], [14]], [71, 34], [[0, 1, 2, 3, 4], [8, 9, 10]]),
    ]
    plain, fused = run_both(runner, steps)
    for p, f in zip(plain, fused):
        np.testing.assert_allclose(f, p, rtol=1e-4, atol=1e-4)
        assert (f.argmax(-1) == p.argmax(-1)).all()


def test_fused_forward_takes_layers_of_one_kind_in_both_code_widths(default_model_path, monkeypatch):
    """A file whose blocks fit 16-level grids in some layers only (mixed GGUF block types) stores
    4-bit panels beside 8-bit ones within one kind; the fused op tells them apart per tensor."""
    runner = ModelRunner(default_model_path, max_model_len=1024, quantization="wint8")
    model = runner.model
    if not model.layers[0].down.four_bit:
        pytest.skip("no 4-bit panels in this build")
    from fastdeploy.model_executor.loader.gguf_loader import load_gguf

    _, weights = load_gguf(default_model_path)
    monkeypatch.setenv(L.ACT8_ENV, "0")  # packs 8-bit panels
    for i in (1, 4):
        model.layers[i].down = L.LinearWeight(weights[f"model.layers.{i}.mlp.down_proj.weight"], None, "wint8")
    assert not model.layers[1].down.four_bit and model.layers[2].down.four_bit
    rng = np.random.default_rng(1)
    a = rng.integers(1, 40000, 20).tolist()
    steps = [([a, [7, 8]], [0, 0], [[0, 1], [8]]), ([[11], [12]], [20, 2], [[0, 1], [8]])]
    plain, fused = run_both(runner, steps)
    for p, f in zip(plain, fused):
        np.testing.assert_allclose(f, p, rtol=1e-4, atol=1e-4)


def test_fused_forward_can_be_turned_off(default_model_path, monkeypatch):
    monkeypatch.setenv("FASTDEPLOY_FUSED_FORWARD", "0")
    runner = ModelRunner(default_model_path, max_model_len=256)
    assert runner.model._fused_forward() is None
