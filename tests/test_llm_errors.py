"""Bad input to the offline API raises a ValueError naming the parameter, and nothing leaks."""
from __future__ import annotations

import pytest

from fastdeploy import SamplingParams
from fastdeploy.engine.args import EngineArgs


def assert_idle(llm):
    stats = llm.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_blocks
    assert not llm.engine.has_unfinished_requests()


def test_too_long_prompt_names_max_model_len(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(10, 2100))], SamplingParams(max_tokens=4), use_tqdm=False)
    assert_idle(llm)


def test_max_tokens_that_cannot_fit(llm):
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate("hello", SamplingParams(max_tokens=5000), use_tqdm=False)
    assert_idle(llm)


def test_one_bad_prompt_in_a_batch_queues_nothing(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[1, 2, 3], [10**9]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert_idle(llm)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs.token_ids) == 3


def test_continue_final_message_needs_an_assistant_reply(llm):
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=2), use_tqdm=False,
                 add_generation_prompt=False, continue_final_message=True)
    out = llm.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, my"}],
                   SamplingParams(temperature=0, max_tokens=2), use_tqdm=False, add_generation_prompt=False,
                   continue_final_message=True)
    assert out[0].prompt.endswith("Hello, my") and len(out[0].outputs.token_ids) == 2
    assert_idle(llm)


def test_logit_bias_outside_the_vocabulary(llm):
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(["hello", "world"], SamplingParams(max_tokens=2, logit_bias={10**7: 1.0}), use_tqdm=False)
    assert_idle(llm)
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=2, logit_bias={28: 100}), use_tqdm=False)
    assert out[0].outputs.token_ids == [28, 28]


@pytest.mark.parametrize("prompts", [[], 42, [[]], {"text": "x"}])
def test_malformed_prompts(llm, prompts):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    assert_idle(llm)


def test_bad_messages_name_the_message(llm):
    with pytest.raises(ValueError, match="messages|message"):
        llm.chat([{"role": "user"}], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="messages"):
        llm.chat([], SamplingParams(max_tokens=2), use_tqdm=False)


def test_sampling_params_list_length_mismatch(llm):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


@pytest.mark.parametrize("kwargs,match", [
    ({"tensor_parallel_size": 2}, "tensor-parallel-size"),
    ({"enable_mm": True}, "enable-mm"),
    ({"block_size": 48}, "block-size"),
    ({"quantization": "fp8"}, "quantization"),
    ({"dtype": "bfloat16"}, "dtype"),
    ({"kv_cache_dtype": "fp8"}, "kv-cache-dtype"),
    ({"guided_decoding_backend": "outlines"}, "guided-decoding-backend"),
])
def test_unsupported_engine_options_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs.from_kwargs(**kwargs).create_engine_config()


def test_kv_cache_dtype_flag_reaches_the_config():
    import argparse

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--kv-cache-dtype", "float32"]))
    assert args.create_engine_config().cache_config.kv_cache_dtype == "float32"
    assert EngineArgs().create_engine_config().cache_config.kv_cache_dtype == "auto"


def test_unknown_engine_kwarg():
    with pytest.raises(TypeError, match="no_such_option"):
        EngineArgs.from_kwargs(no_such_option=1)


def test_unknown_model_says_what_was_looked_for(tmp_path):
    from fastdeploy.model_store import resolve_model

    with pytest.raises(ValueError, match="expected a .gguf file"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        resolve_model(str(tmp_path / "weights.bin"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path / "d"))
