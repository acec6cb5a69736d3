"""Issue 3 acceptance 3: seed 003's text-model examples run as written (model name → default model)."""
from __future__ import annotations

import pytest

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def seed_llm():
    from fastdeploy import LLM

    # As in the seed: LLM(model=..., tensor_parallel_size=1, max_model_len=8192)
    return LLM(model=DEFAULT_MODEL, tensor_parallel_size=1, max_model_len=8192)


def test_chat_example(seed_llm):
    from fastdeploy import SamplingParams

    msg1 = [
        {"role": "system", "content": "I'm a helpful AI assistant."},
        {"role": "user", "content": "把李白的静夜思改写为现代诗"},
    ]
    msg2 = [
        {"role": "system", "content": "I'm a helpful AI assistant."},
        {"role": "user", "content": "Write me a poem about large language model."},
    ]
    messages = [msg1, msg2]
    sampling_params = SamplingParams(top_p=0.95, max_tokens=6400)
    llm = seed_llm
    outputs = llm.chat(messages, sampling_params)
    texts = []
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs.text
        texts.append(generated_text)
        assert prompt and "<|im_start|>" in prompt
        assert output.finished and output.error_code == 200
        assert output.metrics.arrival_time > 0 and output.metrics.inference_start_time >= output.metrics.arrival_time
        assert output.metrics.first_token_time >= 0 and output.metrics.model_execute_time > 0
    assert len(texts) == 2 and all(texts)


def test_generate_example(seed_llm):
    from fastdeploy import SamplingParams

    prompts = [
        "User: 帮我写一篇关于深圳文心公园的500字游记和赏析。\nAssistant: 好的。"
    ]
    sampling_params = SamplingParams(top_p=0.95, max_tokens=6400)
    llm = seed_llm
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs.text
        assert prompt == prompts[0]
        assert output.outputs.token_ids and isinstance(generated_text, str)


def test_thinking_switch_example():
    """The reasoning_parser / chat_template_kwargs form of the seed, on a text-only model."""
    from fastdeploy.entrypoints.llm import LLM

    llm = LLM(model=DEFAULT_MODEL, tensor_parallel_size=1, max_model_len=2048, reasoning_parser="ernie-45-vl",
              num_gpu_blocks_override=64)
    outputs = llm.chat(messages=[{"role": "user", "content": [{"type": "text", "text": "图中的文物属于哪个年代"}]}],
                       chat_template_kwargs={"enable_thinking": False})
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs.text
        reasoning_text = output.outputs.reasoning_content
        assert prompt and generated_text is not None
        assert reasoning_text is None  # thinking switched off: everything is content


def test_token_id_prompts(seed_llm):
    from fastdeploy import SamplingParams

    tok = seed_llm.get_tokenizer()
    ids = tok.encode("The capital of France is")
    p = SamplingParams(temperature=0, max_tokens=4)
    single = seed_llm.generate(ids, p, use_tqdm=False)
    batch = seed_llm.generate([ids, ids[:3]], p, use_tqdm=False)
    as_dict = seed_llm.generate({"prompt_token_ids": ids}, p, use_tqdm=False)
    assert single[0].outputs.token_ids == batch[0].outputs.token_ids == as_dict[0].outputs.token_ids
    assert len(batch) == 2
