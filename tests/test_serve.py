"""`peftlab serve`: the real server (uvicorn) over loopback. Classification over plain HTTP,
a stories260K SFT run through the official `openai` client (streaming included); every bad
request is a 4xx with a JSON error, never a 5xx."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_question_answering import qa_bert, squad_files  # noqa: F401  (fixtures)
from test_token_classification import conll_files, ner_bert  # noqa: F401  (fixtures)

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from peftlab.serve import ServeLimits, create_app

TEXTS = ["the movie was great", "an awful film", "it was fine and great", "awful awful"]
STORIES = Path(os.environ.get("PEFTLAB_DATA", REPO.parent / "shared" / "data")) / "models" / \
    "stories260K"


@contextmanager
def serving(app):
    """The app on uvicorn in a thread, on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def call(url: str, body=None, method: str | None = None, headers: dict | None = None):
    """(status, parsed JSON) of one request; `body` bytes go as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def run_probabilities(run_dir) -> list[list[float]]:
    from peftlab.artifacts import load_trained
    from peftlab.tasks.classification import class_probabilities
    model, tokenizer, recipe, _ = load_trained(run_dir)
    return class_probabilities(model, tokenizer, TEXTS, recipe.model.max_length)


@pytest.fixture(scope="module")
def classifier(learned_lora_run):
    app = create_app(learned_lora_run, ServeLimits(max_chars=200, max_inputs=8, max_batch=16,
                                                   batch_wait_ms=20), api_key="sk-test")
    with serving(app) as url:
        yield url, app, learned_lora_run


KEY = {"Authorization": "Bearer sk-test"}


def test_classify_answers_what_the_run_predicts(classifier):
    url, _, run_dir = classifier
    status, body = call(f"{url}/v1/classify", {"texts": TEXTS}, headers=KEY)
    assert status == 200
    expected = run_probabilities(run_dir)  # unmerged adapter, in-process
    got = [[r["probabilities"]["neg"], r["probabilities"]["pos"]] for r in body["results"]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-5)
    for result, row in zip(body["results"], expected):
        assert result["label"] == ("neg" if row[0] > row[1] else "pos")
    status, one = call(f"{url}/v1/classify", {"text": TEXTS[1]}, headers=KEY)
    assert status == 200 and one["results"][0]["label"] == body["results"][1]["label"]
    assert one["results"][0]["score"] == pytest.approx(body["results"][1]["score"], abs=1e-5)


def test_shared_endpoints(classifier):
    url, _, run_dir = classifier
    assert call(f"{url}/health") == (200, {"status": "ok"})
    status, info = call(f"{url}/info", headers=KEY)
    assert status == 200 and info["task"] == "classification" and info["labels"] == ["neg", "pos"]
    assert info["metrics"] == json.loads((run_dir / "metrics.json").read_text())
    status, models = call(f"{url}/v1/models", headers=KEY)
    assert status == 200 and [m["id"] for m in models["data"]] == [run_dir.name]


BAD_REQUESTS = {  # name: (body, expected status)
    "empty list": ({"texts": []}, 422),
    "neither texts nor text": ({}, 422),
    "both texts and text": ({"texts": ["a"], "text": "b"}, 422),
    "a number for a text": ({"texts": [3]}, 422),
    "a string for the list": ({"texts": "great"}, 422),
    "an empty text": ({"texts": ["great", "  "]}, 422),
    "an unknown field": ({"texts": ["great"], "temperature": 1}, 422),
    "a text over max_chars": ({"text": "great " * 50}, 413),
    "more inputs than max_inputs": ({"texts": ["great"] * 9}, 413),
    "malformed JSON": (b'{"texts": ["great"', 422),
    "a JSON array": (b'["great"]', 422),
    "no body": (b"", 422),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_json_error(classifier, case):
    url, _, _ = classifier
    body, expected = BAD_REQUESTS[case]
    status, error = call(f"{url}/v1/classify", body, method="POST", headers=KEY)
    assert status == expected, error
    assert set(error["error"]) == {"message", "type", "code"} and error["error"]["message"]


def test_auth_unknown_paths_and_methods_are_4xx(classifier):
    url, _, _ = classifier
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
        status, error = call(f"{url}/v1/classify", {"texts": ["great"]}, headers=headers)
        assert status == 401 and error["error"]["type"] == "authentication_error"
        assert call(f"{url}/info", headers=headers)[0] == 401
    assert call(f"{url}/v1/nothing", {"texts": ["a"]}, headers=KEY)[0] == 404
    assert call(f"{url}/v1/classify", method="GET", headers=KEY)[0] == 405


def test_concurrent_requests_share_forward_passes(classifier):
    """16 clients at once: every answer is its own text's, and the batcher gathered inputs
    from several requests into one forward pass."""
    url, app, _ = classifier
    batcher = app.state.batcher
    before = len(batcher.batch_sizes)
    alone = {text: call(f"{url}/v1/classify", {"text": text}, headers=KEY)[1]["results"][0]
             for text in TEXTS}
    jobs = [TEXTS[i % len(TEXTS)] for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda text: call(f"{url}/v1/classify", {"text": text},
                                                  headers=KEY), jobs))
    assert all(status == 200 for status, _ in answers)
    for text, (_, body) in zip(jobs, answers):
        got, want = body["results"][0], alone[text]
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    sizes = batcher.batch_sizes[before + len(TEXTS):]
    assert sum(sizes) == len(jobs) and max(sizes) > 1 and len(sizes) < len(jobs)


def test_cli_serves_from_a_fresh_process(learned_lora_run, monkeypatch):
    """`peftlab serve` as users start it: a new process, loopback, the key from an env var."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "MY_KEY": "sk-fresh"}
    process = subprocess.Popen([sys.executable, "-m", "peftlab", "serve", str(learned_lora_run),
                                "--port", str(port), "--api-key-env", "MY_KEY"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if call(f"{url}/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        status, body = call(f"{url}/v1/classify", {"texts": TEXTS},
                            headers={"Authorization": "Bearer sk-fresh"})
        assert status == 200
        expected = run_probabilities(learned_lora_run)
        assert [r["label"] for r in body["results"]] == [
            "neg" if row[0] > row[1] else "pos" for row in expected]
        assert call(f"{url}/v1/classify", {"texts": TEXTS})[0] == 401
    finally:
        process.terminate()
        process.wait(10)
    missing = subprocess.run([sys.executable, "-m", "peftlab", "serve", str(learned_lora_run),
                              "--api-key-env", "NOT_SET_ANYWHERE"], capture_output=True, check=False,
                             text=True, env={k: v for k, v in os.environ.items()
                                             if k != "NOT_SET_ANYWHERE"})
    assert missing.returncode == 2 and "NOT_SET_ANYWHERE" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


# --- causal LM: the OpenAI API ----------------------------------------------------------
@pytest.fixture(scope="module")
def stories_server(tmp_path_factory):
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip("needs ../shared/data/models/stories260K")
    openai = pytest.importorskip("openai")
    from peftlab.config import load_recipe
    from peftlab.train import run
    folder = tmp_path_factory.mktemp("stories_serve")
    recipe = load_recipe(REPO / "recipes" / "stories260k_alpaca_lora.yaml",
                         ["train.max_steps=4", "train.eval_at_start=false",
                          "eval.max_new_tokens=4", "train.mixed_precision=no",
                          "train.report_to=[none]", "train.keep_checkpoints=0",
                          f"data.train={STORIES.parent.parent / 'alpaca_demo' / 'alpaca_en_demo.json'}"])
    run(recipe, output_dir=str(folder / "run"))
    from conftest import reset_accelerate_state
    reset_accelerate_state()
    app = create_app(folder / "run", ServeLimits(max_new_tokens=32), api_key="sk-lm")
    with serving(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="sk-lm", max_retries=0), url, \
            folder / "run"


def test_openai_client_chat_completion_equals_predict(stories_server, capsys):
    client, _, run_dir = stories_server
    (model,) = [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story."}],
        temperature=0, max_tokens=12)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 12
    from peftlab.cli import main
    capsys.readouterr()
    assert main(["predict", str(run_dir), "--prompt", "Tell me a story.",
                 "--max-new-tokens", "12"]) == 0
    assert choice.message.content.strip() == capsys.readouterr().out.strip()


def test_openai_client_streams_the_same_text(stories_server):
    client, _, _ = stories_server
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Once upon a time"}]
    whole = client.chat.completions.create(model="run", messages=messages, temperature=0,
                                           max_tokens=16).choices[0]
    pieces, reasons = [], []
    for chunk in client.chat.completions.create(model="run", messages=messages,
                                                temperature=0, max_tokens=16, stream=True):
        assert chunk.object == "chat.completion.chunk"
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == whole.message.content and len(pieces) > 3
    assert reasons[-1] == whole.finish_reason and not any(reasons[:-1])
    text = client.completions.create(model="run", prompt="Once upon a time", max_tokens=8,
                                     temperature=0).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="run", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True))
    assert text and streamed == text


def test_openai_errors_are_4xx(stories_server):
    import openai
    client, url, _ = stories_server
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="run", max_tokens=33, **chat)  # over the limit
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="run", n=2, **chat)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", **chat)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions\
            .create(model="run", **chat)
    for body in ({"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                 {"messages": [{"role": "user", "content": 5}]}, {"prompt": ""},
                 {"prompt": "x" * 9000}):
        path = "completions" if "prompt" in body else "chat/completions"
        status, error = call(f"{url}/v1/{path}", body, headers={"Authorization":
                                                                "Bearer sk-lm"})
        assert 400 <= status < 500 and error["error"]["message"], body


# --- NER and extractive QA -----------------------------------------------------------------
def test_entities_endpoint_answers_what_predict_finds(tmp_path, ner_bert, conll_files):  # noqa: F811
    from test_token_classification import ner_recipe

    from peftlab.artifacts import load_trained
    from peftlab.config import load_recipe
    from peftlab.tasks.token_classification import tag_texts
    from peftlab.train import run
    run(load_recipe(ner_recipe(tmp_path / "r.yaml", ner_bert, conll_files)),
        output_dir=str(tmp_path / "run"))
    texts = ["Angela Merkel visited Paris", "nothing here"]
    model, tokenizer, recipe, info = load_trained(tmp_path / "run")
    expected = tag_texts(model, tokenizer, texts, recipe.model.max_length, info["tag_names"])
    with serving(create_app(tmp_path / "run")) as url:
        status, body = call(f"{url}/v1/entities", {"texts": texts})
        assert status == 200
        for got, want, text in zip(body["results"], expected, texts):
            assert [(e["entity"], e["start"], e["end"]) for e in got["entities"]] == \
                [(e["entity"], e["start"], e["end"]) for e in want]
            assert all(text[e["start"]:e["end"]] == e["text"] for e in got["entities"])
        assert call(f"{url}/v1/entities", {"texts": [""]})[0] == 422
        assert call(f"{url}/v1/classify", {"texts": texts})[0] == 404  # not this task's


def test_answer_endpoint_answers_what_predict_finds(tmp_path, qa_bert, squad_files):  # noqa: F811
    from test_question_answering import qa_recipe

    from peftlab.artifacts import load_trained
    from peftlab.config import load_recipe
    from peftlab.tasks.question_answering import answer_questions
    from peftlab.train import run
    run(load_recipe(qa_recipe(tmp_path / "r.yaml", qa_bert, squad_files,
                              train={"epochs": 4})), output_dir=str(tmp_path / "run"))
    paragraphs = json.loads(squad_files["test"].read_text())["data"][0]["paragraphs"][:3]
    contexts = [p["context"] for p in paragraphs]
    questions = [p["qas"][0]["question"] for p in paragraphs]
    model, tokenizer, recipe, info = load_trained(tmp_path / "run")
    expected = answer_questions(model, tokenizer, recipe, questions, contexts,
                                info.get("unanswerable", False))
    with serving(create_app(tmp_path / "run")) as url:
        status, body = call(f"{url}/v1/answer", {"questions": [
            {"question": q, "context": c} for q, c in zip(questions, contexts)]})
        assert status == 200
        for got, (answer, score, start, end), context in zip(body["results"], expected,
                                                             contexts):
            assert (got["answer"], got["start"], got["end"]) == (answer, start, end)
            assert got["score"] == pytest.approx(score, abs=1e-5)
            assert context[got["start"]:got["end"]] == got["answer"]
        status, one = call(f"{url}/v1/answer", {"question": questions[0],
                                                "context": contexts[0]})
        assert status == 200 and one["results"][0]["answer"] == expected[0][0]
        for bad in ({"question": questions[0]}, {"questions": []},
                    {"questions": [{"question": "x"}]}, {"question": "", "context": contexts[0]},
                    {"question": "x", "context": contexts[0], "questions": []}):
            assert call(f"{url}/v1/answer", bad)[0] == 422, bad
