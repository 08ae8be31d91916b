"""Print how fast split_span cuts large texts with a tiktoken cl100k count.

Run: .venv/bin/python benchmarks/split_speed.py [--max-tokens 2000] [--overlap 0]

Three generated texts, each at 1 MB and 10 MB of UTF-8: English prose (sentences and
paragraphs), CJK without spaces (only 。 and ， between runs of characters) and one
huge line of English words (no line breaks). The cl100k encoding is read from the
copy that ships inside litellm, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from rlm_graph.split import split_span

_WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his "
    "from at which but have an they you were her she there been one all we their "
    "river market signal window harbour quietly although measured twelve northern "
    "because evidence kitchen lantern stubborn gravel orchard whisper"
).split()
_HANZI = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会"
    "自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开"
)
_MB = 1_000_000


def main() -> None:
    """Split each generated text and print the throughput."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=2000)
    parser.add_argument("--overlap", type=int, default=0)
    args = parser.parse_args()

    count = _cl100k_counter()
    calls, counting_s = [0], [0.0]

    def counted(text: str) -> int:
        began = time.perf_counter()
        tokens = count(text)
        calls[0] += 1
        counting_s[0] += time.perf_counter() - began
        return tokens

    print(f"max_tokens={args.max_tokens} overlap={args.overlap} count=cl100k")
    print("'counting' is time inside count_tokens; 'own' is the rest (the splitter)")
    header = ("text", "MB", "seconds", "MB/s", "spans", "counts", "counting", "own")
    print("{:<9} {:>3} {:>8} {:>6} {:>6} {:>7} {:>9} {:>6}".format(*header))
    for name, make in (("prose", _prose), ("cjk", _cjk), ("one-line", _one_line)):
        for size_mb in (1, 10):
            text = make(size_mb * _MB)
            calls[0], counting_s[0] = 0, 0.0
            began = time.perf_counter()
            children = split_span(
                text,
                0,
                len(text),
                max_tokens=args.max_tokens,
                count_tokens=counted,
                overlap_tokens=args.overlap,
            )
            seconds = time.perf_counter() - began
            print(
                f"{name:<9} {size_mb:>3} {seconds:>8.2f} {size_mb / seconds:>6.2f} "
                f"{len(children):>6} {calls[0]:>7} {counting_s[0]:>9.2f} "
                f"{seconds - counting_s[0]:>6.2f}"
            )


def _cl100k_counter() -> Callable[[str], int]:
    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        raise SystemExit("litellm is not installed; it carries the cl100k file.")
    tokenizers = Path(spec.origin).parent / "litellm_core_utils" / "tokenizers"
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(tokenizers))

    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base")
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def _prose(size: int) -> str:
    rng = random.Random(1)
    paragraphs, used = [], 0
    while used < size:
        sentences = []
        for _ in range(rng.randint(2, 8)):
            words = rng.choices(_WORDS, k=rng.randint(5, 25))
            sentences.append(" ".join(words).capitalize() + rng.choice(".!?."))
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        used += len(paragraph) + 2
    return _cut_to_bytes("\n\n".join(paragraphs), size)


def _cjk(size: int) -> str:
    rng = random.Random(2)
    parts = []
    for _ in range(size // 3 // 10 + 1):
        parts.append("".join(rng.choices(_HANZI, k=rng.randint(4, 16))))
        parts.append(rng.choice("，，。"))
    return _cut_to_bytes("".join(parts), size)


def _one_line(size: int) -> str:
    rng = random.Random(3)
    words = rng.choices(_WORDS, k=size // 4)
    return _cut_to_bytes(" ".join(words), size)


def _cut_to_bytes(text: str, size: int) -> str:
    return text.encode()[:size].decode(errors="ignore")


if __name__ == "__main__":
    main()
