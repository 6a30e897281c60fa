"""Cached frozen features: the same run as uncached where the frozen part has no dropout."""

import json

import pytest
import torch
from conftest import reset_accelerate_state, write_recipe

from peftlab.config import load_recipe
from peftlab.errors import PeftlabError
from peftlab.train import run

CASES = {  # strategy, pooling: the pooled vector (mean) and the last frozen layer's states
    "head_mean": ({"kind": "head"}, "mean", "pooled"),
    "head_cls": ({"kind": "head"}, "cls", "layer"),
    "freeze_1": ({"kind": "freeze", "freeze_layers": 1}, "cls", "layer"),
}


def _recipe(tmp_path, tiny_bert, sentiment_csv, strategy, pooling, cache, **train):
    return load_recipe(write_recipe(
        tmp_path / f"r_{cache}.yaml", tiny_bert, sentiment_csv,
        model={"max_length": 16, "pooling": pooling}, strategy=strategy,
        train={"epochs": 2, "batch_size": 16, "lr": 1e-2, "mixed_precision": "no",
               "log_every_steps": 5, "eval_every_steps": 10, "cache_frozen": cache,
               "keep_checkpoints": 0, **train}))


@pytest.mark.parametrize("case", CASES)
def test_cached_run_equals_uncached_run(tmp_path, tiny_bert, sentiment_csv, case, capsys):
    """tiny_bert has no dropout, so eval-mode features are the train-mode ones: loss curve,
    evaluations, final metrics and saved weights equal the uncached run (1e-5)."""
    strategy, pooling, kind = CASES[case]
    results = {}
    for cache in (True, False):
        recipe = _recipe(tmp_path, tiny_bert, sentiment_csv, strategy, pooling, cache)
        results[cache] = run(recipe, output_dir=str(tmp_path / f"run_{cache}"))
        reset_accelerate_state()
    printed = capsys.readouterr().out
    assert "run once" in printed and ("body" in printed) == (kind == "pooled")
    cached, plain = results[True], results[False]
    assert cached["summary"]["cache_frozen"] and not plain["summary"]["cache_frozen"]
    curve = [p["loss"] for p in cached["summary"]["loss_history"]]
    assert len(curve) >= 4 and curve[0] > curve[-1]  # it learns
    assert curve == pytest.approx([p["loss"] for p in plain["summary"]["loss_history"]],
                                  abs=1e-5)
    for split in ("validation", "test"):
        assert cached["metrics"][split]["loss"] == pytest.approx(
            plain["metrics"][split]["loss"], abs=1e-5)
    weights = [dict(r["model"].named_parameters()) for r in (cached, plain)]
    for name, param in weights[0].items():
        if name.endswith("attention.self.key.bias"):
            # softmax ignores a shift shared by every key, so this gradient is zero up to
            # rounding, and AdamW scales that rounding noise up to lr-sized steps: its values
            # depend on the CPU's kernels (it differed by 2e-5 on an AVX-512 host without bf16)
            continue
        torch.testing.assert_close(param, weights[1][name], rtol=1e-4, atol=1e-5)


def test_cached_head_run_predicts_raw_text_after_reload(tmp_path, tiny_bert, sentiment_csv):
    """The cache changes the loop, not the model: a fresh load of the run predicts raw text
    with the probabilities of the model at the end of training."""
    from peftlab.artifacts import load_trained
    recipe = _recipe(tmp_path, tiny_bert, sentiment_csv, {"kind": "head"}, "mean", True)
    result = run(recipe, output_dir=str(tmp_path / "run"))
    model, tokenizer, _, _ = load_trained(tmp_path / "run")
    texts = ["the movie was great", "an awful film"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reloaded = model(**batch).logits.softmax(-1)
        trained = result["model"].eval()(**batch).logits.softmax(-1)
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "run" / "frozen_cache").exists() is False  # nothing left behind


def test_auto_caches_only_when_the_frozen_part_would_run_twice(tmp_path, tiny_bert,
                                                               sentiment_csv, capsys):
    once = _recipe(tmp_path, tiny_bert, sentiment_csv, {"kind": "head"}, "mean", "auto",
                   epochs=1, eval_every_steps=0)
    assert not run(once, output_dir=str(tmp_path / "once"))["summary"]["cache_frozen"]
    assert "cache_frozen auto: off" in capsys.readouterr().out
    reset_accelerate_state()
    twice = _recipe(tmp_path, tiny_bert, sentiment_csv, {"kind": "head"}, "mean", "auto",
                    epochs=2, eval_every_steps=0)
    assert run(twice, output_dir=str(tmp_path / "twice"))["summary"]["cache_frozen"]
    reset_accelerate_state()
    lora = _recipe(tmp_path, tiny_bert, sentiment_csv, {"kind": "lora", "lora_r": 4}, "mean",
                   "auto")
    assert not run(lora, output_dir=str(tmp_path / "lora"))["summary"]["cache_frozen"]


def test_cache_true_on_a_strategy_without_a_frozen_bottom_is_an_error(tmp_path, tiny_bert,
                                                                      sentiment_csv):
    recipe = _recipe(tmp_path, tiny_bert, sentiment_csv, {"kind": "lora", "lora_r": 4},
                     "mean", True)
    with pytest.raises(PeftlabError, match="train.cache_frozen"):
        run(recipe, output_dir=str(tmp_path / "run"))


def test_memory_mapped_cache_gives_the_same_run(tmp_path, tiny_bert, sentiment_csv,
                                                monkeypatch):
    """When the features do not fit in memory they go to a memory-mapped file under the run
    folder (unlinked at once): the run is the in-memory one."""
    from peftlab import frozen_cache
    recipe = _recipe(tmp_path, tiny_bert, sentiment_csv, {"kind": "head"}, "cls", True)
    in_memory = run(recipe, output_dir=str(tmp_path / "memory"))
    reset_accelerate_state()
    monkeypatch.setattr(frozen_cache, "memory_available", lambda: 0)
    mapped_stores = []
    real_store = frozen_cache.FeatureStore

    def recording_store(*args, **kwargs):
        store = real_store(*args, **kwargs)
        mapped_stores.append(args[-1])
        return store

    monkeypatch.setattr(frozen_cache, "FeatureStore", recording_store)
    mapped = run(recipe, output_dir=str(tmp_path / "mapped"))
    assert mapped_stores and all(f == tmp_path / "mapped" / "frozen_cache"
                                 for f in mapped_stores)
    assert not list((tmp_path / "mapped" / "frozen_cache").iterdir())  # unlinked
    assert json.dumps(mapped["metrics"]) == json.dumps(in_memory["metrics"])


@pytest.mark.parametrize("case", ["head_mean", "freeze_1"])
def test_cache_in_bf16_stores_bf16_features(tmp_path, tiny_bert, sentiment_csv, case):
    """The run's precision: a bf16 run caches bf16 features (freeze's fp32 body ends in
    fp32 norms under autocast; they are stored in bf16) and still learns."""
    from peftlab import frozen_cache
    seen = []
    real_fill = frozen_cache.fill_store

    def recording_fill(*args, **kwargs):
        store = real_fill(*args, **kwargs)
        if kwargs.get("run_precision"):  # train; evaluation keeps the layers' own dtype
            seen.append(store.data.dtype)
        return store

    frozen_cache.fill_store = recording_fill
    try:
        strategy, pooling, _ = CASES[case]
        recipe = _recipe(tmp_path, tiny_bert, sentiment_csv, strategy, pooling, True,
                         mixed_precision="bf16")
        result = run(recipe, output_dir=str(tmp_path / "run"))
    finally:
        frozen_cache.fill_store = real_fill
    assert seen and set(seen) == {torch.bfloat16}
    curve = [p["loss"] for p in result["summary"]["loss_history"]]
    assert curve[-1] < curve[0]


@pytest.mark.parametrize("case,precision", [("head_mean", "no"), ("head_cls", "bf16"),
                                            ("freeze_1", "no"), ("freeze_1", "bf16")])
def test_planner_counts_the_bytes_the_cache_really_holds(tmp_path, tiny_bert, sentiment_csv,
                                                         monkeypatch, case, precision):
    """`peftlab plan` adds the cached features (alive the whole run) to head and freeze: the
    bytes it predicts are those of the stores the run then fills, in each precision."""
    from peftlab import frozen_cache
    from peftlab.memory import plan
    strategy, pooling, _ = CASES[case]
    recipe = _recipe(tmp_path, tiny_bert, sentiment_csv, strategy, pooling, True,
                     mixed_precision=precision)
    (predicted,) = plan(recipe, "cpu", [strategy["kind"]])
    filled = []
    real_fill = frozen_cache.fill_store
    monkeypatch.setattr(frozen_cache, "fill_store", lambda *a, **k: filled.append(
        real_fill(*a, **k)) or filled[-1])
    run(recipe, output_dir=str(tmp_path / "run"))
    assert len(filled) == 3 and predicted.cache > 0
    assert predicted.cache == sum(store.data.nbytes for store in filled)
    off = _recipe(tmp_path, tiny_bert, sentiment_csv, strategy, pooling, False,
                  mixed_precision=precision)
    (uncached,) = plan(off, "cpu", [strategy["kind"]], overhead=predicted.overhead)
    assert uncached.cache == 0 and predicted.total - uncached.total == predicted.cache


def test_planner_counts_no_cache_where_auto_would_not_cache(tmp_path, tiny_bert, sentiment_csv):
    from peftlab.memory import format_plan, plan
    head = {"kind": "head", "freeze_layers": 1}  # what the freeze row would freeze
    recipe = _recipe(tmp_path, tiny_bert, sentiment_csv, head, "mean", "auto",
                     epochs=1, eval_every_steps=0)
    estimates = plan(recipe, "cpu", ["head", "lora", "freeze"])
    assert [e.cache for e in estimates] == [0, 0, 0]
    assert "frozen cache" not in format_plan(estimates, None)
    recipe = _recipe(tmp_path, tiny_bert, sentiment_csv, head, "mean", "auto")
    estimates = plan(recipe, "cpu", ["head", "lora", "freeze"])
    assert estimates[0].cache > 0 and estimates[1].cache == 0 and estimates[2].cache > 0
    assert "frozen cache" in format_plan(estimates, None)
