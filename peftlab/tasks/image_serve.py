"""`peftlab serve` for image classification: POST /v1/images/classify, micro-batched.

It takes a multipart upload (one or more `file` fields) or JSON `{"image": BASE64}` /
`{"images": [BASE64, ...]}`. Anything that does not decode as an image, or is larger than
--max-image-bytes, is a 4xx before it reaches the model.
"""

import base64
import binascii

from fastapi import HTTPException, Request

from peftlab.serve import Served
from peftlab.tasks.classification_serve import labelled
from peftlab.tasks.image_classification import image_probabilities
from peftlab.tasks.image_data import _decodes


def _checked(images: list[bytes], served: Served) -> list[bytes]:
    limits = served.limits
    if not images:
        raise HTTPException(422, "no image: upload `file` fields (multipart) or send JSON "
                                 "{\"image\": base64} or {\"images\": [...]}")
    if len(images) > limits.max_inputs:
        raise HTTPException(413, f"{len(images)} images, at most {limits.max_inputs} per "
                                 f"request")
    for number, data in enumerate(images):
        if len(data) > limits.max_image_bytes:
            raise HTTPException(413, f"image {number}: {len(data)} bytes, at most "
                                     f"{limits.max_image_bytes}")
        if not _decodes(data):
            raise HTTPException(415, f"image {number}: not a readable image")
    return images


def _base64(value, number: int) -> bytes:
    if not isinstance(value, str):
        raise HTTPException(422, f"image {number}: expected a base64 string")
    try:
        return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:")
                                else value, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"image {number}: not valid base64") from None


async def images_of(request: Request) -> list[bytes]:
    """The request's images as bytes, from multipart fields or base64 JSON."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        files = [item for _, item in form.multi_items() if hasattr(item, "read")]
        return [await item.read() for item in files]
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "send multipart/form-data or a JSON body") from None
    if not isinstance(body, dict) or set(body) - {"image", "images"} or \
            ("image" in body) == ("images" in body):
        raise HTTPException(422, "give exactly one of 'image' (base64) or 'images' (a list)")
    values = [body["image"]] if "image" in body else body["images"]
    if not isinstance(values, list):
        raise HTTPException(422, "'images' must be a list of base64 strings")
    return [_base64(value, number) for number, value in enumerate(values)]


def add_routes(app, served: Served, auth) -> None:
    names = served.info["label_names"]
    batcher = served.batcher(lambda images: image_probabilities(
        served.model, served.tokenizer, images, served.info["precision"],
        batch_size=served.limits.max_batch))
    app.state.batcher = batcher

    @app.post("/v1/images/classify", dependencies=[auth])
    async def classify_images(request: Request):
        images = _checked(await images_of(request), served)
        return {"model": served.model_id, "results": labelled(await batcher.submit(images),
                                                              names)}
