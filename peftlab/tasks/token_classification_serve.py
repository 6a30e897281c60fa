"""`peftlab serve` for NER: POST /v1/entities, micro-batched."""

from peftlab.serve import Served, check_texts
from peftlab.tasks.classification_serve import ClassifyRequest, texts_of
from peftlab.tasks.token_classification import tag_texts


def add_routes(app, served: Served, auth) -> None:
    batcher = served.batcher(lambda texts: tag_texts(
        served.model, served.tokenizer, texts, served.recipe.model.max_length,
        served.info["tag_names"], served.info["precision"],
        batch_size=served.limits.max_batch))
    app.state.batcher = batcher

    @app.post("/v1/entities", dependencies=[auth])
    async def entities(request: ClassifyRequest):
        """Entities of each text with character offsets into it (end exclusive)."""
        texts = texts_of(request)
        check_texts(texts, served.limits)
        found = await batcher.submit(texts)
        return {"model": served.model_id,
                "results": [{"text": text, "entities": items} for text, items in
                            zip(texts, found)]}
