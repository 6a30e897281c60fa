"""`peftlab serve` for classification: POST /v1/classify, micro-batched."""

from pydantic import BaseModel, ConfigDict, StrictStr

from peftlab.serve import Served, check_texts
from peftlab.tasks.classification import class_probabilities


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] | None = None  # several texts, or
    text: StrictStr | None = None  # one


def texts_of(request) -> list[str]:
    """`texts` or `text`, exactly one of them (shared with NER)."""
    from fastapi import HTTPException
    if (request.texts is None) == (request.text is None):
        raise HTTPException(422, "give exactly one of 'texts' (a list) or 'text'")
    return request.texts if request.texts is not None else [request.text]


def labelled(rows: list[list[float]], names: list[str]) -> list[dict]:
    """Each input's best label, its probability and every label's (shared with images)."""
    results = []
    for row in rows:
        best = max(range(len(row)), key=row.__getitem__)
        results.append({"label": names[best], "score": row[best],
                        "probabilities": dict(zip(names, row))})
    return results


def add_routes(app, served: Served, auth) -> None:
    names = served.info["label_names"]
    batcher = served.batcher(lambda texts: class_probabilities(
        served.model, served.tokenizer, texts, served.recipe.model.max_length,
        served.info["precision"], batch_size=served.limits.max_batch))
    app.state.batcher = batcher

    @app.post("/v1/classify", dependencies=[auth])
    async def classify(request: ClassifyRequest):
        texts = texts_of(request)
        check_texts(texts, served.limits)
        return {"model": served.model_id, "results": labelled(await batcher.submit(texts),
                                                              names)}
