"""bitsandbytes 8-bit and 4-bit on the CPU: every student shape scores, or load() says why.

bitsandbytes' 4-bit matmul for CPUs with AVX512-BF16 repacks each weight at its first forward and
only takes out_features % 32 == 0 and in_features % blocksize (64) == 0; the random student made
for a teacher of your own (hidden size 96, the default student's until it became the sample teacher's
layers) has neither. The shapes below include it and ones further off
(odd sizes, a hidden size of 33); on a CPU without that kernel the same tests run bitsandbytes'
generic path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from pairs import DOCS, QUERY, as_array

import answerfirst

bitsandbytes = pytest.importorskip("bitsandbytes")

from shapes import SHAPES  # noqa: E402
from shapes import shaped_checkpoint as make_checkpoint  # noqa: E402

from answerfirst.runtime._torch import cpu_4bit_packable  # noqa: E402  (needs torch, like bitsandbytes)

# max |dp| against fp32 on random weights (std 0.08, the worst case for quantization): measured
# 0.004-0.013 (8-bit) and 0.01-0.12 (4-bit NF4) over SHAPES
# max |dp| against fp32 on random weights (peakier and less regular than trained ones). 4-bit NF4
# measured up to 0.255 here (hidden 96, after the prompt's lead-space change moved the inputs), so its
# bound is GGUF Q4_K_M's parity bound (0.35); 8-bit stays far below its own.
BOUNDS = {"8bit": 0.05, "4bit": 0.35}


@pytest.fixture(scope="module", params=list(SHAPES))
def shaped_checkpoint(request, tiny_checkpoint, tmp_path_factory):
    return make_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp(request.param) / "model", request.param)


def test_the_packing_constraint():
    assert cpu_4bit_packable(256, 128, 64) and cpu_4bit_packable(96, 256, 64)  # 96 outputs: 3 blocks of 32
    assert not cpu_4bit_packable(96, 96, 64)  # the student's q_proj: 96 inputs are 1.5 blocks of 64
    assert not cpu_4bit_packable(100, 128, 64)  # 100 outputs are not whole blocks of 32
    assert cpu_4bit_packable(96, 96, 32) and not cpu_4bit_packable(96, 96, 128)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_every_shape_scores_close_to_fp32(shaped_checkpoint, quantization):
    reference = as_array(answerfirst.load(shaped_checkpoint).score(QUERY, DOCS))
    scorer = answerfirst.load(shaped_checkpoint, quantization=quantization)
    got = as_array(scorer.score(QUERY, DOCS))
    assert np.isfinite(got).all() and np.abs(got - reference).max() < BOUNDS[quantization]
    assert np.abs(got - reference).max() > 0  # really quantized
    if quantization == "4bit":
        layers = [m for m in scorer.backend.model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
        assert layers
        for layer in layers:  # the fast kernel wherever it takes the shape, the generic path elsewhere
            fast = getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
            kernel = bitsandbytes.functional.has_avx512bf16()
            assert fast == (kernel and cpu_4bit_packable(layer.out_features, layer.in_features, layer.weight.blocksize))


def test_4bit_weights_are_repacked_at_load_so_threads_never_race(tiny_checkpoint):
    scorer = answerfirst.load(tiny_checkpoint, quantization="4bit")
    expected = as_array(scorer.score(QUERY, DOCS))
    fresh = answerfirst.load(tiny_checkpoint, quantization="4bit")  # scored first from four threads at once
    results, errors = [], []

    def work():
        try:
            results.append(as_array(fresh.score(QUERY, DOCS)))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 4
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-6)


def test_a_layer_bitsandbytes_cannot_run_fails_at_load_in_one_line(tiny_checkpoint, monkeypatch):
    """Whatever bitsandbytes raises inside its first forward (here: the error the hidden-96 student
    gave before its layers were fitted) comes out of load(), naming the model and the fix."""
    def broken(*args, **kwargs):
        raise RuntimeError("shape '[96, 1]' is invalid for input of size 144")

    monkeypatch.setattr(bitsandbytes.nn.Linear4bit, "forward", lambda self, x: broken())
    with pytest.raises(RuntimeError, match=rf"quantization='4bit' cannot run {tiny_checkpoint} on cpu \(RuntimeError: shape "
                       r"'\[96, 1\]' is invalid for input of size 144\); load it with quantization='8bit', or without") as error:
        answerfirst.load(tiny_checkpoint, quantization="4bit")
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no traceback from inside bitsandbytes
