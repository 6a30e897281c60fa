"""The planner's census of image models (peftlab/census.py) against what autograd really
saves on CPU, for every strategy in fp32 and under real bf16 autocast, and `peftlab plan` on
image recipes."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from test_image_classification import save_vision_model

from peftlab.census import Census
from peftlab.cli import main
from peftlab.config import recipe_from_dict
from peftlab.memory import SST2_FITTED_CPU_HEAP_SLACK, estimate, plan
from peftlab.model_shape import shape_of
from peftlab.strategies import apply_strategy
from peftlab.tasks.image_classification import build_image_model, summed_cross_entropy

pytest.importorskip("torchvision")
BATCH = 8


@pytest.fixture(scope="module", params=["vit", "resnet"])
def vision_model(request, tmp_path_factory):
    return request.param, save_vision_model(tmp_path_factory.mktemp(request.param),
                                            request.param)


def image_recipe(folder, kind: str, precision: str = "no", **train):
    """Precision pinned: `auto` would follow the host's bf16 support."""
    return recipe_from_dict({
        "model": {"name": str(folder), "task": "image_classification", "from_config": True},
        "data": {"train": "x"},
        "strategy": {"kind": kind, "lora_r": 4, "freeze_layers": 1},
        "train": {"batch_size": BATCH, "mixed_precision": precision, **train},
        "eval": {"batch_size": 16}})


def real_saved_bytes(model, precision: str) -> int:
    """Unique storages autograd keeps in one CPU training forward, parameters excluded
    (autocast's bf16 weight copies included: they are memory the step holds)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    held, sizes = [], {}

    def pack(tensor):
        held.append(tensor)  # alive to the end, so no storage is freed and reused
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            sizes[storage._cdata] = storage.nbytes()
        return tensor

    torch.manual_seed(0)
    batch = {"pixel_values": torch.randn(BATCH, 3, 16, 16),
             "labels": torch.randint(0, 2, (BATCH,))}
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        summed_cross_entropy(model.train(), batch)
    return sum(sizes.values())


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("kind", ["full", "freeze", "lora", "dora", "head"])
def test_census_counts_what_autograd_saves(vision_model, kind, precision):
    arch, folder = vision_model
    recipe = image_recipe(folder, kind, precision)
    census = shape_of(recipe)
    assert isinstance(census, Census)
    counted = census.of(kind, False, 2 if precision == "bf16" else 4, "cpu")
    torch.manual_seed(0)
    model = apply_strategy(build_image_model(str(folder), ["a", "b"], recipe, True),
                           recipe).model
    assert counted.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    real = real_saved_bytes(model, precision)
    predicted = counted.saved_fixed + BATCH * counted.saved_per_example
    assert predicted == pytest.approx(real, rel=0.01), (arch, kind, precision)
    if kind != "head":
        assert counted.saved_per_example > 0


@pytest.fixture(scope="module")
def vit_with_attention_dropout(tmp_path_factory):
    import json
    folder = save_vision_model(tmp_path_factory.mktemp("vit_dropout"), "vit")
    config = json.loads((folder / "config.json").read_text())
    config["attention_probs_dropout_prob"] = 0.1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_census_counts_attention_dropout_by_device(vit_with_attention_dropout, tmp_path,
                                                   kind, precision):
    """On CPU, attention dropout runs peftlab/fast_attention.py's path, which the census
    counts as autograd saves it; a GPU plan keeps SDPA's fused kernels (no seq x seq
    tensors), so it counts as if the dropout were off."""
    folder = vit_with_attention_dropout
    recipe = image_recipe(folder, kind, precision)
    element = 2 if precision == "bf16" else 4
    counted = shape_of(recipe).of(kind, False, element, "cpu")
    torch.manual_seed(0)
    model = apply_strategy(build_image_model(str(folder), ["a", "b"], recipe, True),
                           recipe).model
    real = real_saved_bytes(model, precision)
    assert counted.saved_fixed + BATCH * counted.saved_per_example == pytest.approx(
        real, rel=0.01)
    no_dropout = save_vision_model(tmp_path / "plain", "vit")
    gpu = shape_of(recipe).of(kind, False, element, "cuda")
    gpu_plain = shape_of(image_recipe(no_dropout, kind, precision)).of(kind, False, element,
                                                                       "cuda")
    assert gpu.saved_per_example == gpu_plain.saved_per_example
    assert gpu.saved_per_example < counted.saved_per_example


def test_estimate_grows_with_the_batch_and_the_heap_slack(vision_model):
    _, folder = vision_model
    recipe = image_recipe(folder, "full")
    census = shape_of(recipe)
    small, big = (estimate(census, recipe, "full", micro, False, 0.0, "cpu")
                  for micro in (8, 16))
    counted = census.of("full", False, 4, "cpu")
    per_example = counted.saved_per_example + 2 * counted.largest_per_example
    assert big.activations - small.activations == pytest.approx(
        8 * per_example * (1 + SST2_FITTED_CPU_HEAP_SLACK))
    gpu = estimate(census, recipe, "full", 8, False, 0.0, "cuda")
    assert gpu.activations < small.activations  # no CPU heap slack on a GPU
    head = estimate(census, recipe, "head", 8, False, 0.0, "cpu")
    assert head.activations < small.activations and head.trainable < small.trainable


def test_plan_command_sizes_image_recipes(vision_model, tmp_path, capsys):
    arch, folder = vision_model
    recipe = tmp_path / "images.yaml"
    recipe.write_text(f"model: {{name: {folder}, task: image_classification, "
                      f"from_config: true}}\ndata: {{train: x}}\n"
                      f"train: {{batch_size: 8, mixed_precision: 'no'}}\n")
    assert main(["plan", str(recipe), "--device", "cpu", "--budget", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 8 x 3x16x16 images" in out
    for kind in ("full", "freeze", "gradual", "lora", "dora", "head"):
        assert f"| {kind} |" in out
    # bitsandbytes quantizes linear layers: a ResNet has none to put in 4 bits
    assert ("| qlora |" in out) == (arch == "vit")
    assert "recommended within 8GiB: strategy.kind=lora train.batch_size=8" in out  # its own


def test_gradual_plans_as_full_and_adapters_on_random_weights_keep_a_base(vision_model):
    _, folder = vision_model
    rows = {e.kind: e for e in plan(image_recipe(folder, "full"), "cpu",
                                    ("full", "gradual", "lora"), overhead=0.0)}
    assert rows["gradual"].total == rows["full"].total  # it ends with everything open
    census = shape_of(image_recipe(folder, "lora"))
    lora = census.of("lora", False, 4, "cpu")
    # a from_config adapter run keeps its initial weights in memory for RUN/base
    assert rows["lora"].weights == pytest.approx(lora.weights + census.total * 4)
