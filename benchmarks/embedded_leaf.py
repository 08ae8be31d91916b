"""Which leaf prompt the embedded model can answer: accuracy on fixed single spans.

Run: ``.venv/bin/python benchmarks/embedded_leaf.py --variants engine,extract``
(``--help`` for the rest). Each case is one leaf call: a span of the bundled
book's prose (300 to 1,500 tokens, shuffled paragraphs) holding one planted fact
and up to two look-alike decoys (the same sentence about another colour or
name), or, for negative cases, only decoys. Four fact templates (a code, a
city, a time, a builder), so a prompt cannot be tuned to one of them. Cases are
a pure function of the seed.

A case scores 1 when the engine's verification accepts the reply and the
accepted answer contains the planted value (positives), or when it accepts no
answer as found (negatives: "not stated", or a rejected reply). ``raw`` counts
replies whose answer field contains the value, verified or not.

Variants (all with the JSON grammar of their schema, greedy, one thread):

- ``old``: the leaf prompt before this benchmark (answer + quote, free answer);
- ``engine``: whatever :func:`rlm_graph.nodes.prompts.leaf_messages` sends now
  for the plan's kind (``--kind``); ``--reask`` adds one re-ask with the reason;
- ``extract``: only an answer, "copy the words that answer the question";
- ``extract-ex``: the same with a one-line worked example before the question;
- ``sentence``: copy the sentence that answers, then the answer from it;
- ``sentonly``: copy the sentence that answers, nothing else;
- ``run`` (alone): each case through the whole engine (``arun`` on the span,
  one leaf of ``--chunk-tokens``), with its re-asks, focus and finer splits.

Prompts that share a prefix reuse llama.cpp's evaluated tokens, so the span is
read once per case and the variants after the first cost only their own words.

Measured 2026-12-04, seed 0, 20 cases (16 with the fact, 4 with decoys only),
SmolLM2-135M Q4_1, one thread, load 3.9-5.2 (other test runs on the 2 cores):

| variant | accuracy | found | negatives | seconds |
|---|---:|---:|---:|---:|
| old (answer + quote) | 0.25 | 3/16 | 2/4 | 363 |
| engine, `text`, control characters kept out of strings | 0.25 | 3/16 | 2/4 | 52* |
| extract | 0.40 | 4/16 | 4/4 | 67* |
| extract-ex (worked example) | 0.20 | 0/16 | 4/4 | 75* |
| sentence, then answer | 0.30 | 2/16 | 4/4 | 91* |
| sentence only | 0.20 | 3/16 | 1/4 | 42* |
| engine, `short` (extract, no braces or quote marks) | 0.40 | 4/16 | 4/4 | 489 |
| run, `short`: re-ask, focus, split once | 0.75 | 11/16 | 4/4 | 564 (115 calls) |

(* after the span was read by the variant before it.) What the 135M model does:
it copies the sentence most like the question, often whole ("The green train
leaves the station at 5:40 every morning"), or only its first words, stopping
where the answer begins ("The secret code for the ivory door"): 5 of 20 replies
in the first run. Without the grammar excluding them it wrote " }" inside the
answer string and ran on (4 of 16); the worked example made it answer the
example's "6:30" in 16 of 20. In the run, 4 of the 11 found answers came from
asking about the one sentence a restating reply pointed at (verdict
``ok-focused``). By span size (run): 3/4,
2/4, 3/4, 3/4 at 300, 600, 1,000, 1,500 tokens: no gain from smaller spans in
this range, so leaves stay at 1,500 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from rlm_graph import local
from rlm_graph.eval.generators import filler_paragraphs
from rlm_graph.models import Completion
from rlm_graph.nodes.prompts import leaf_messages, schema_for
from rlm_graph.nodes.types import Task
from rlm_graph.nodes.verify import verify_leaf

MODEL = local.EMBEDDED_MODEL
_COLOURS = ("amber", "blue", "crimson", "green", "ivory", "violet", "silver", "teal")
_PLACES = ("door", "vault", "gate", "locker", "cellar", "archive")
_NAMES = ("Mr. Okafor", "Mrs. Lindqvist", "Dr. Haddad", "Ms. Moreau", "Mr. Tanaka", "Dr. Petrova")
_CITIES = ("Lisbon", "Montreal", "Nairobi", "Osaka", "Valparaiso", "Tallinn", "Perth", "Bergen")
_SURNAMES = ("Whitcombe", "Adeyemi", "Castellano", "Nakamura", "Rosenthal", "Kowalczyk", "Ferreira")
SIZES = (300, 600, 1000, 1500)


@dataclass(frozen=True)
class Case:
    """One leaf span with a question and its planted answer (None: not there)."""

    name: str
    text: str
    question: str
    expected: str | None


def _fact(rng: random.Random, template: int, subject: str) -> tuple[str, str, str]:
    """Sentence, question and answer of one fact about ``subject``."""
    if template == 0:
        colour, place = subject.split("/")
        code = str(rng.randrange(1000, 9999))
        return (f"The secret code for the {colour} {place} is {code}.",
                f"What is the secret code for the {colour} {place}?", code)
    if template == 1:
        city = rng.choice(_CITIES)
        return (f"{subject} moved to {city} last spring.", f"Where did {subject} move to?", city)
    if template == 2:
        time_ = f"{rng.randrange(5, 12)}:{rng.choice(['05', '15', '20', '40', '50'])}"
        return (f"The {subject} train leaves the station at {time_} every morning.",
                f"When does the {subject} train leave the station?", time_)
    builder = rng.choice(_SURNAMES)
    return (f"The {subject} bridge was built by an engineer named {builder}.",
            f"Who built the {subject} bridge?", builder)


def _subjects(rng: random.Random, template: int, n: int) -> list[str]:
    if template == 0:
        place = rng.choice(_PLACES)
        return [f"{colour}/{place}" for colour in rng.sample(_COLOURS, n)]
    if template == 1:
        return rng.sample(_NAMES, n)
    return rng.sample(_COLOURS, n)


def make_cases(seed: int, count: int, negatives: int) -> list[Case]:
    """``count`` cases, the last ``negatives`` of them without the asked fact."""
    rng = random.Random(f"embedded-leaf/{seed}")
    paragraphs = filler_paragraphs(rng)
    cases = []
    for index in range(count):
        template = index % 4
        tokens = SIZES[(index // 4) % len(SIZES)]
        decoys = rng.choice((0, 1, 2)) if index < count - negatives else rng.choice((1, 2))
        subjects = _subjects(rng, template, 1 + decoys)
        sentence, question, answer = _fact(rng, template, subjects[0])
        planted = [] if index >= count - negatives else [sentence]
        planted += [_fact(rng, template, s)[0] for s in subjects[1:]]
        start = rng.randrange(len(paragraphs))
        chosen, size = [], 0
        while size < tokens * 4:
            paragraph = paragraphs[(start + len(chosen)) % len(paragraphs)]
            chosen.append(paragraph)
            size += len(paragraph) + 2
        for fact in planted:
            chosen.insert(rng.randrange(len(chosen) + 1), fact)
        expected = answer if index < count - negatives else None
        cases.append(Case(f"c{index:02d}-t{template}-{tokens}-d{decoys}", "\n\n".join(chosen), question, expected))
    return cases


OLD_INSTRUCTION = (
    "If the text answers the question, give the answer in a few words and "
    "copy the sentence of the text that says it; otherwise answer "
    '"not stated".'
)
OLD_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 300},
        "quote": {"type": "string", "maxLength": 300},
    },
    "required": ["answer", "quote"],
}


def _old_messages(case: Case) -> list[dict[str, str]]:
    user = (f"Text (part of haystack.txt):\n<<<\n{case.text}\n>>>\n\n"
            f"Question: {case.question}\n{OLD_INSTRUCTION}")
    return [{"role": "system", "content": "Answer questions about a text. Use only the text. Reply in JSON."},
            {"role": "user", "content": user}]


def _task(case: Case) -> Task:
    return Task(id="0", start=0, end=len(case.text), depth=1, question=case.question, tokens=0)


def _engine_messages(kind: str, feedback: str | None = None):
    def build(case: Case) -> list[dict[str, str]]:
        return leaf_messages(kind, _task(case), case.text, feedback=feedback, file_hint="haystack.txt")
    return build


_SYSTEM = "Answer questions about a text. Use only the text. Reply in JSON."


def _prompt(instruction: str, *, example: str = ""):
    def build(case: Case) -> list[dict[str, str]]:
        user = (f"Text (part of haystack.txt):\n<<<\n{case.text}\n>>>\n\n{example}"
                f"Question: {case.question}\n{instruction}")
        return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]
    return build


def _schema(*fields: tuple[str, int]) -> dict[str, Any]:
    return {"type": "object",
            "properties": {name: {"type": "string", "maxLength": size} for name, size in fields},
            "required": [name for name, _ in fields]}


EXTRACT = ("Copy from the text the words that answer the question (a name, a number, "
           "a time or a short phrase), exactly as written. If the text does not say, "
           'answer "not stated".')
SENTENCE = ("Copy the one sentence of the text that answers the question, exactly as "
            "written, then give the answer in a few words taken from that sentence. If "
            'no sentence answers it, write "not stated" in both.')
SENTENCE_ONLY = ("Copy the one sentence of the text that answers the question, exactly "
                 'as written. If no sentence answers it, write "not stated".')
EXAMPLE = ('Example. Text: "Tom sold his bicycle. The red shop closes at 6:30 on '
           'Fridays." Question: When does the red shop close? Reply: {"answer": "6:30"}\n\n')


def variants(kind: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Name -> (messages builder, schema)."""
    return {
        "old": (_old_messages, OLD_SCHEMA),
        "engine": (_engine_messages(kind), schema_for(kind)),
        "extract": (_prompt(EXTRACT), _schema(("answer", 80))),
        "extract-ex": (_prompt(EXTRACT, example=EXAMPLE), _schema(("answer", 80))),
        "sentence": (_prompt(SENTENCE), _schema(("sentence", 300), ("answer", 80))),
        "sentonly": (_prompt(SENTENCE_ONLY), _schema(("sentence", 300))),
    }


def _prototype_check(case: Case, name: str, data: dict[str, Any]) -> tuple[bool, str | None]:
    """Prototype verification of the new forms: (found, answer) or found=False."""
    from rlm_graph.nodes.verify import _NOT_STATED, locate_quote

    answer = str(data.get("answer") or "").strip()
    sentence = str(data.get("sentence") or "").strip()
    if name == "sentonly":
        answer = sentence
    if not answer or _NOT_STATED.match(answer):
        return False, None
    if name == "sentence" and sentence and not _NOT_STATED.match(sentence):
        where = locate_quote(case.text, 0, len(case.text), sentence)
        if where is None:
            return False, "sentence not in text"
        if answer.casefold() not in where.quote.casefold():
            return False, "answer not in sentence"
        return True, answer
    import regex
    words = [regex.escape(w) for w in answer.split()]
    pattern = regex.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", regex.IGNORECASE)
    if pattern.search(case.text) is None:
        return False, "answer not in text"
    return True, answer


def run(models: local.LocalModels, messages: list[dict[str, str]], schema: dict[str, Any],
        max_tokens: int) -> tuple[Completion, float]:
    started = time.perf_counter()
    response = models.completion(MODEL, messages, optional_params={
        "max_tokens": max_tokens,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    })
    choice = response.choices[0]
    completion = Completion(
        text=choice.message.content or "", finish_reason=choice.finish_reason or "stop",
        prompt_tokens=response.usage.prompt_tokens, completion_tokens=response.usage.completion_tokens,
    )
    return completion, time.perf_counter() - started


def judge(case: Case, kind: str, completion: Completion, name: str = "engine") -> tuple[int, int, str]:
    """(engine score, raw score, shown answer) of one reply."""
    try:
        data = json.loads(completion.text)
        raw_answer = str(data.get("answer") or data.get("sentence") or "")
    except (ValueError, AttributeError):
        data, raw_answer = None, ""
    if name not in ("old", "engine"):
        if not isinstance(data, dict):
            return (int(case.expected is None), int(case.expected is None), "malformed")
        found, said = _prototype_check(case, name, data)
        if case.expected is None:
            return int(not found), int(raw_answer.strip().casefold() in ("", "not stated")), str(said)
        ok = found and case.expected.casefold() in (said or "").casefold()
        return int(ok), int(case.expected.casefold() in raw_answer.casefold()), str(said)
    verdict = verify_leaf(case.text, _task(case), kind, completion)
    answer = verdict.answer
    shown = verdict.code if answer is None else (answer.text or "-")
    if case.expected is None:
        found = answer is not None and answer.found
        return int(not found), int(raw_answer.strip().casefold() in ("", "not stated")), shown
    ok = answer is not None and answer.found and case.expected.casefold() in (answer.text or "").casefold()
    return int(ok), int(case.expected.casefold() in raw_answer.casefold()), shown


def run_engine(cases: list[Case], args: argparse.Namespace) -> None:
    """The ``run`` variant: each case through the whole engine (one leaf of the
    planned size, rules' plan), with its re-asks, focus and finer splits."""
    import asyncio

    from rlm_graph import arun

    async def one(case: Case) -> tuple[int, int, float, str, str]:
        started = time.perf_counter()
        result = await arun(case.question, text=case.text, kind=args.kind, planner="rules",
                            chunk_tokens=args.chunk_tokens, store="memory")
        elapsed = time.perf_counter() - started
        said = str(result.answer) if result.found else "-"
        if case.expected is None:
            ok = int(not result.found)
        else:
            ok = int(result.found and case.expected.casefold() in said.casefold())
        verdicts = ",".join(sorted({n.verdict for n in _walk(result.tree)}))
        return ok, result.usage.calls, elapsed, said, verdicts

    scores, calls, seconds = [], 0, 0.0
    for case in cases:
        ok, n, elapsed, said, verdicts = asyncio.run(one(case))
        scores.append(ok)
        calls += n
        seconds += elapsed
        print(f"{case.name:18} run ok={ok} calls={n} {elapsed:5.1f}s want={case.expected!s:10} "
              f"got={said[:60]!r} verdicts={verdicts}", flush=True)
    pos = [s for s, c in zip(scores, cases) if c.expected is not None]
    neg = [s for s, c in zip(scores, cases) if c.expected is None]
    print(f"\n{len(cases)} cases, seed {args.seed}, load {os.getloadavg()[0]:.1f}")
    print(f"run        accuracy {sum(scores) / len(scores):.2f} (found {sum(pos)}/{len(pos)}, "
          f"negatives {sum(neg)}/{len(neg)}), {calls} calls, {seconds:.0f} s")


def _walk(node: Any) -> Any:
    yield node
    for child in node.children:
        yield from _walk(child)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="old,engine")
    parser.add_argument("--kind", default="text", help="answer kind of the engine variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--negatives", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--only", default="", help="comma-separated case indexes")
    parser.add_argument("--chunk-tokens", type=int, default=1500, help="run variant: leaf size")
    parser.add_argument("--reask", action="store_true",
                        help="engine variant: ask a rejected reply again once with the reason, as the engine does")
    parser.add_argument("--json", type=Path, help="write every reply here")
    args = parser.parse_args()

    cases = make_cases(args.seed, args.cases, args.negatives)
    if args.only:
        cases = [cases[int(i)] for i in args.only.split(",")]
    if args.variants == "run":
        run_engine(cases, args)
        return
    chosen = {name: spec for name, spec in variants(args.kind).items() if name in args.variants.split(",")}
    models = local.LocalModels(n_threads=1)
    scores: dict[str, list[int]] = {name: [] for name in chosen}
    raws: dict[str, list[int]] = {name: [] for name in chosen}
    seconds: dict[str, float] = {name: 0.0 for name in chosen}
    records = []
    for case in cases:
        for name, (build, schema) in chosen.items():
            kind = "text" if name == "old" else args.kind
            completion, elapsed = run(models, build(case), schema, args.max_tokens)
            ok, raw, shown = judge(case, kind, completion, name)
            if args.reask and name == "engine":
                # The engine's loop: a rejected reply is asked again once with the reason.
                verdict = verify_leaf(case.text, _task(case), kind, completion)
                if not verdict.ok and verdict.feedback:
                    again = _engine_messages(kind, verdict.feedback)(case)
                    completion, more = run(models, again, schema, args.max_tokens)
                    elapsed += more
                    ok, raw, shown = judge(case, kind, completion, name)
                    shown = f"(re-asked) {shown}"
            scores[name].append(ok)
            raws[name].append(raw)
            seconds[name] += elapsed
            records.append({"case": case.name, "variant": name, "ok": ok, "raw": raw,
                            "reply": completion.text, "seconds": round(elapsed, 2)})
            print(f"{case.name:18} {name:10} ok={ok} raw={raw} {elapsed:5.1f}s "
                  f"want={case.expected!s:10} got={shown[:50]!r} reply={completion.text[:90]!r}", flush=True)
    load = os.getloadavg()[0]
    print(f"\n{len(cases)} cases, seed {args.seed}, load {load:.1f}")
    for name in chosen:
        n = len(scores[name])
        pos = [s for s, c in zip(scores[name], cases) if c.expected is not None]
        neg = [s for s, c in zip(scores[name], cases) if c.expected is None]
        print(f"{name:10} accuracy {sum(scores[name]) / n:.2f} (found {sum(pos)}/{len(pos)}, "
              f"negatives {sum(neg)}/{len(neg)}), raw {sum(raws[name]) / n:.2f}, {seconds[name]:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    models.close()


if __name__ == "__main__":
    main()
