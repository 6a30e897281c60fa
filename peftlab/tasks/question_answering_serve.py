"""`peftlab serve` for extractive QA: POST /v1/answer, micro-batched by question."""

from pydantic import BaseModel, ConfigDict, StrictStr

from peftlab.serve import Served, check_texts
from peftlab.tasks.question_answering import answer_questions


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: StrictStr
    context: StrictStr


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    questions: list[Question] | None = None  # several, or
    question: StrictStr | None = None  # one, with
    context: StrictStr | None = None


def add_routes(app, served: Served, auth) -> None:
    from fastapi import HTTPException
    unanswerable = served.info.get("unanswerable", False)

    def answer(pairs: list[tuple[str, str]]) -> list:
        return answer_questions(served.model, served.tokenizer, served.recipe,
                                [q for q, _ in pairs], [c for _, c in pairs], unanswerable,
                                served.info["precision"])
    batcher = served.batcher(answer)
    app.state.batcher = batcher

    @app.post("/v1/answer", dependencies=[auth])
    async def answer_endpoint(request: AnswerRequest):
        """The answer span of each question in its context: text, probability and character
        offsets into the context ("" and -1 when the run allows no answer)."""
        single = request.question is not None or request.context is not None
        if single == (request.questions is not None) or \
                single and (request.question is None or request.context is None):
            raise HTTPException(422, "give 'questions' (a list of {question, context}) or "
                                     "both 'question' and 'context'")
        pairs = [(q.question, q.context) for q in request.questions] if not single else \
            [(request.question, request.context)]
        check_texts([q for q, _ in pairs], served.limits, "question")
        check_texts([c for _, c in pairs], served.limits, "context")
        results = await batcher.submit(pairs)
        return {"model": served.model_id, "results": [
            {"question": q, "answer": text, "score": score, "start": start, "end": end}
            for (q, _), (text, score, start, end) in zip(pairs, results)]}
