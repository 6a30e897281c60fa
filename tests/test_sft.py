"""Causal-LM supervised fine-tuning: label masks, templates, packing, token-normalised loss."""

import json

import pytest
import torch
from conftest import reset_accelerate_state, write_recipe
from safetensors.torch import load_file
from transformers import AutoTokenizer

from peftlab.config import load_recipe
from peftlab.tasks.sft_data import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE,
    detect_sft_format,
    encode,
    pack,
    render,
)
from peftlab.train import run

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")



@pytest.fixture
def tokenizer(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def labelled(tokenizer, example, fmt, max_length=64):
    encoded = encode(tokenizer, *render(tokenizer, example, fmt), max_length)
    return tokenizer.convert_ids_to_tokens(encoded["input_ids"]), encoded["labels"]


def targets(tokens, labels):
    return [t for t, label in zip(tokens, labels) if label != IGNORE]


def test_prompt_completion_mask_by_hand(tokenizer):
    tokens, labels = labelled(tokenizer, ("the movie was", " great"), "prompt_completion")
    assert tokens == ["<s>", "the", "movie", "was", "great", "</s>"]
    assert labels[:4] == [IGNORE] * 4
    assert targets(tokens, labels) == ["great", "</s>"]


def test_chat_mask_with_default_template_multi_turn(tokenizer):
    example = [{"role": "user", "content": "the movie"}, {"role": "assistant", "content": "good"},
               {"role": "user", "content": "the plot"}, {"role": "assistant", "content": "bad"}]
    tokens, labels = labelled(tokenizer, example, "chat")
    assert targets(tokens, labels) == ["good", "</s>", "bad", "</s>"]
    assert tokens.count("</s>") == 2 and tokens[-1] == "</s>"  # EOS ends every answer


def test_model_chat_template_is_used_and_eos_appended(tokenizer):
    tokenizer.chat_template = CHATML
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    example = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "the film"},
               {"role": "assistant", "content": "great"}]
    text, _ = render(tokenizer, example, "chat")
    assert text.startswith("<|im_start|>system\nbe nice<|im_end|>")
    assert text.endswith("great<|im_end|>\n</s>")
    tokens, labels = labelled(tokenizer, example, "chat")
    assert targets(tokens, labels) == ["great", "<|im_end|>", "</s>"]


def test_alpaca_and_sharegpt_rows():
    assert detect_sft_format(["instruction", "input", "output"], "auto", "x") == "alpaca"
    assert detect_sft_format(["conversations"], "auto", "x") == "chat"
    assert detect_sft_format(["prompt", "completion"], "auto", "x") == "prompt_completion"
    from peftlab.errors import PeftlabError
    with pytest.raises(PeftlabError, match="cannot tell the SFT format"):
        detect_sft_format(["question"], "auto", "x")


def test_truncation_keeps_mask_aligned(tokenizer):
    tokens, labels = labelled(tokenizer, ("the movie was really", " great nice"),
                              "prompt_completion", max_length=6)
    assert len(tokens) == 6 and tokens[-1] == "great"
    assert targets(tokens, labels) == ["great"]


def test_packing_boundaries():
    a = {"input_ids": [1, 10, 11, 12], "labels": [IGNORE, IGNORE, 11, 12]}
    b = {"input_ids": [1, 20, 21], "labels": [1, 20, 21]}
    c = {"input_ids": [1, 30, 31, 32, 33], "labels": [IGNORE, 30, 31, 32, 33]}
    rows = pack([a, b, c], max_length=8)
    assert [r["input_ids"] for r in rows] == [[1, 10, 11, 12, 1, 20, 21], [1, 30, 31, 32, 33]]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 0, 1, 2]
    # the first token of every packed example is never a target (no loss across boundaries)
    assert rows[0]["labels"] == [IGNORE, IGNORE, 11, 12, IGNORE, 20, 21]


def alpaca_file(tmp_path, n=96):
    rows = []
    for i in range(n):
        good = i % 2 == 0
        rows.append({"instruction": "the movie was " + ("great" if good else "awful"),
                     "input": "", "output": "nice" if good else "bad"})
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path


def test_sft_lowers_held_out_loss_and_writes_samples(tmp_path, tiny_llama, capsys):
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", tiny_llama, alpaca_file(tmp_path), model={"task": "causal_lm"},
        strategy={"kind": "full"},
        train={"epochs": 3, "batch_size": 8, "lr": 1e-2}, eval={"max_new_tokens": 4}))
    result = run(recipe, output_dir=str(tmp_path / "run"))
    history = result["summary"]["eval_history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert result["metrics"]["test"]["perplexity"] < 5
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").open()]
    assert {s["step"] for s in samples} == {h["step"] for h in history}
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    # predict --prompt renders like training and generates what the best step generated
    best = [s for s in samples if s["step"] == result["summary"]["best_step"]]
    instruction = best[0]["prompt"].split("### Instruction:\n")[1].split("\n\n")[0]
    from peftlab.cli import main
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), "--prompt", instruction,
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == best[0]["generation"].strip()


def test_token_normalised_accumulation_matches_bigger_batch(tmp_path, tiny_llama):
    """Examples of different lengths: batch 4 x 2 equals batch 8 x 1 because the loss is
    divided by the target tokens of the whole step, not averaged per micro-batch."""
    rows = [{"prompt": "the movie", "completion": " was " + " ".join(["good"] * (1 + i % 5))}
            for i in range(64)]
    data = tmp_path / "pc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    weights = []
    for batch, accum in ((8, 1), (4, 2)):
        recipe = load_recipe(write_recipe(
            tmp_path / f"r{batch}.yaml", tiny_llama, data, model={"task": "causal_lm"},
            strategy={"kind": "full"}, eval={"max_new_tokens": 1},
            train={"batch_size": batch, "grad_accum": accum, "max_steps": 4, "lr": 1e-3,
                   "warmup_ratio": 0.0,
                   "group_by_length": False}))  # its order depends on the batch size
        run(recipe, output_dir=str(tmp_path / f"run{batch}"))
        weights.append(load_file(tmp_path / f"run{batch}" / "model" / "model.safetensors"))
        reset_accelerate_state()
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-5), name


def test_packed_rows_train_end_to_end(tmp_path, tiny_llama):
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", tiny_llama, alpaca_file(tmp_path), model={"task": "causal_lm",
                                                                     "max_length": 64},
        data={"packing": True}, strategy={"kind": "full"}, eval={"max_new_tokens": 1},
        train={"max_steps": 2, "batch_size": 2}))
    result = run(recipe, output_dir=str(tmp_path / "run"))
    assert result["summary"]["steps"] == 2


def test_merged_causal_lm_matches_adapter(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    from peftlab.artifacts import load_trained
    from peftlab.cli import main
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", tiny_llama, alpaca_file(tmp_path), model={"task": "causal_lm"},
        eval={"max_new_tokens": 1}, train={"max_steps": 3, "lr": 1e-2}))
    run(recipe, output_dir=str(tmp_path / "run"))
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapter, tokenizer, *_ = load_trained(tmp_path / "run")
    ids = tokenizer(["the movie was great", "a bad film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, adapter(**ids).logits, atol=1e-4)


def test_eval_command_scores_a_causal_lm_run(tmp_path, tiny_llama, capsys):
    from peftlab.cli import main
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", tiny_llama, alpaca_file(tmp_path), model={"task": "causal_lm"},
        strategy={"kind": "full"}, eval={"max_new_tokens": 1},
        train={"epochs": 2, "batch_size": 8, "lr": 1e-2}))
    result = run(recipe, output_dir=str(tmp_path / "run"))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json", str(tmp_path / "m.json")]) == 0
    scored = json.loads((tmp_path / "m.json").read_text())
    assert scored["test"]["loss"] == pytest.approx(result["metrics"]["test"]["loss"], rel=1e-4)
    assert main(["eval", str(tmp_path / "run"), "--data", str(alpaca_file(tmp_path, 10))]) == 0
    assert "eval: loss=" in capsys.readouterr().out


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(tiny_llama, kernel):
    """An example packed after another gets the logits it gets alone, on every attention
    kernel: packed batches carry no attention mask and the loss runs without a KV cache, so
    transformers builds one causal block per example from the restarted position_ids."""
    from transformers import AutoModelForCausalLM

    from peftlab.tasks.causal_lm import token_losses
    from peftlab.tasks.sft_data import collate_sft
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=kernel).eval()
    first = {"input_ids": [1, 10, 11, 12, 13, 14], "labels": [IGNORE, 10, 11, 12, 13, 14]}
    second = {"input_ids": [1, 20, 21, 22, 23], "labels": [IGNORE, 20, 21, 22, 23]}
    collate = collate_sft(pad_token_id=2)
    packed = collate(pack([first, second], max_length=32))
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, 11)
    alone = collate([second])
    with torch.no_grad():
        inputs = {k: v for k, v in packed.items() if k != "labels"}
        packed_logits = model(**inputs, use_cache=False).logits[0, 6:]
        alone_logits = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
        assert (packed_logits - alone_logits).abs().max() < 1e-5
        # and the loss the loop uses: the same per-token losses, packed or not
        packed_loss, packed_count = token_losses(model, packed)
        loss_first, count_first = token_losses(model, collate([first]))
        loss_second, count_second = token_losses(model, alone)
    assert packed_count.item() == count_first.item() + count_second.item()
    assert packed_loss.item() == pytest.approx(loss_first.item() + loss_second.item(), abs=1e-4)


def test_max_train_samples_counts_examples_before_packing(tmp_path, tiny_llama):
    from peftlab.models import load_tokenizer
    from peftlab.tasks.sft_data import load_sft_data
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", tiny_llama, alpaca_file(tmp_path, n=60),
        model={"task": "causal_lm", "max_length": 128},
        data={"packing": True, "max_train_samples": 7}))
    data = load_sft_data(recipe, load_tokenizer(str(tiny_llama), recipe))
    starts = sum(row["position_ids"].count(0) for row in data.splits["train"])
    assert starts == 7 and data.report["train"]["used"] == 7
    assert len(data.splits["train"]) < 7  # whole examples packed into fewer rows


def test_perplexity_as_best_metric_keeps_the_lowest(tmp_path, tiny_llama):
    """Lower is better for perplexity as for loss: the restored checkpoint is the one with
    the lowest perplexity, and early stopping waits while it keeps falling."""
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", tiny_llama, alpaca_file(tmp_path), model={"task": "causal_lm"},
        strategy={"kind": "full"}, eval={"max_new_tokens": 1},
        train={"epochs": 2, "batch_size": 8, "lr": 1e-2, "eval_at_start": True,
               "eval_every_steps": 4, "metric_for_best": "perplexity",
               "early_stopping_patience": 2}))
    result = run(recipe, output_dir=str(tmp_path / "run"))
    history = result["summary"]["eval_history"]
    lowest = min(history, key=lambda point: point["perplexity"])
    assert history[0]["perplexity"] > lowest["perplexity"] * 1.5  # it did improve
    assert result["summary"]["best_step"] == lowest["step"]
    assert result["summary"]["best_value"] == lowest["perplexity"]
    assert result["metrics"]["validation"]["perplexity"] == pytest.approx(
        lowest["perplexity"], rel=1e-6)  # the restored weights are that checkpoint's


def test_sft_tokens_come_from_the_cache_on_a_second_load(tmp_path, tiny_llama, monkeypatch):
    """The second load of the same file renders nothing and gives the same token ids and
    labels; a different chat template is a different entry, since the tokenizer's JSON does
    not hold it."""
    from peftlab.models import load_tokenizer
    from peftlab.tasks import sft_data
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_llama, alpaca_file(tmp_path),
                                      model={"task": "causal_lm"}))
    rendered = []
    render = sft_data.render
    monkeypatch.setattr(sft_data, "render", lambda *a: rendered.append(1) or render(*a))
    first = sft_data.load_sft_data(recipe, load_tokenizer(str(tiny_llama), recipe))
    assert len(rendered) == 96
    again = sft_data.load_sft_data(recipe, load_tokenizer(str(tiny_llama), recipe))
    assert len(rendered) == 96 and again.report == first.report
    for split in first.splits:
        assert again.splits[split].to_list() == first.splits[split].to_list()
    assert again.prompts == first.prompts
    other = load_tokenizer(str(tiny_llama), recipe)
    other.chat_template = sft_data.DEFAULT_CHAT_TEMPLATE.replace("### Response:\n", "### Response:\nthe movie ")
    changed = sft_data.load_sft_data(recipe, other)
    assert len(rendered) == 192
    assert changed.splits["train"]["input_ids"][0] != first.splits["train"]["input_ids"][0]
