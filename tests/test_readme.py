"""The README's examples run as written (against a TINY bundle instead of the demo's)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_embedding_the_runtime_example_runs(tiny_fp32_bundle, capsys):
    (code,) = python_blocks("Embedding the runtime")
    assert 'Pipeline.from_bundle("out/demo/bundle")' in code
    code = code.replace('"out/demo/bundle"', repr(str(tiny_fp32_bundle)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    record = namespace["record"]
    assert record["schema"] == 2 and record["input"] == {"path": None, "sha256": None, "frame": 0}
    assert record["image_hw"] == [480, 640] and record["prompt"].startswith("Please help")
    assert {"quality", "warnings", "masks", "measurements", "runtime"} <= set(record)
    assert namespace["result"].quality is not None
