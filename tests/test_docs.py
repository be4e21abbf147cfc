"""The documentation: every relative link in README.md, docs/*.md and benchmarks/README.md resolves (file and
#anchor); the README's Python blocks run on the CPU (each block is marked `<!-- test_docs: run -->` or
`<!-- test_docs: skip: <reason> -->`); docs/results.md is what the results ledger gives, byte for byte; the README
stays within 200 lines and holds the two fresh-clone commands, the second of which is what .ci/run runs;
benchmarks/results/ holds the ledger and at most a handful of curated summaries, no logs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from torch_metal_fused.bench import ledger, results

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])
MAIN_COMMAND = "bash tools/setup.sh && python3 -m torch_metal_fused.bench"
TEST_COMMAND = "bash tools/setup.sh && python3 -m pytest -q"

_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_MARK = re.compile(r"<!--\s*test_docs:\s*(run|skip:\s*\S.*?)\s*-->")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (code and link text kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    found: dict[str, int] = {}
    anchors = set()
    fenced = False
    for line in path.read_text().splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slug = _slug(m.group(1))
            n = found.get(slug, 0)
            found[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
        anchors.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return anchors


def _links(path: Path) -> list[str]:
    return [m.group(1) for line in _prose(path.read_text()) for m in _LINK.finditer(line)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    links = _links(doc)
    broken = []
    for target in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.exists():
            broken.append(f"{target}: no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_sees_links_and_anchors():
    assert _slug("The mutation check (`tools/mutate.py`)") == "the-mutation-check-toolsmutatepy"
    assert _slug("Two commands (fresh clone)") == "two-commands-fresh-clone"
    assert "docs/status.md" in _links(README) and "#status" in _links(README)
    assert _links_in("see [a](x.md#y) and `[b](not/a/link.md)` and ![img](pic.png)") == ["x.md#y"]


def _links_in(text: str) -> list[str]:
    return [m.group(1) for line in _prose(text) for m in _LINK.finditer(line)]


def _python_blocks(text: str) -> list[tuple[str, str]]:
    """(mark, code) of each ```python block; mark is 'run', 'skip: <reason>' or '' (unmarked)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            before = next((line for line in reversed(lines[:i]) if line.strip()), "")
            m = _MARK.search(before)
            blocks.append((m.group(1) if m else "", "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return blocks


def test_every_readme_python_block_is_marked():
    blocks = _python_blocks(README.read_text())
    assert blocks, "the README has a quick start"
    unmarked = [code.splitlines()[0] for mark, code in blocks if not mark]
    assert not unmarked, f"mark them <!-- test_docs: run --> or <!-- test_docs: skip: why -->: {unmarked}"


def test_readme_python_blocks_run_on_cpu(tmp_path):
    """The blocks marked run, in order, in one script: the quick start and patch_model on a tiny Llama (built from a
    config: nothing is downloaded), one training step."""
    code = [c for mark, c in _python_blocks(README.read_text()) if mark == "run"]
    if any("transformers" in c or "peft" in c for c in code):
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(code) + "\n")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "patched" in done.stdout  # the patch report
    assert re.search(r"^(metal|cuda|reference)$", done.stdout, re.MULTILINE)  # backend_for: "reference" on a CPU


def test_results_md_is_what_the_ledger_gives():
    expected = results.render(ledger.read(ledger.DEFAULT_LEDGER))
    assert ledger.DEFAULT_RESULTS_MD.read_text() == expected, (
        "docs/results.md is stale: python3 -m torch_metal_fused.bench.results"
    )


def test_the_ledger_has_its_columns_and_parses():
    rows = ledger.read(ledger.DEFAULT_LEDGER)
    assert rows
    for r in rows:
        assert r["run"] and re.fullmatch(r"\d{4}-\d\d-\d\d", r["date"]) and r["device"] and r["op"], r
        assert r["mode"] in ("forward", "backward", "forward_backward"), r
        assert r["p50_us"] or r["bytes_moved"], r  # a timing, or a count of the harness


def test_readme_is_short_and_holds_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    commands = [line.strip() for line in text.splitlines() if line.startswith("    bash tools/setup.sh")]
    assert commands == [MAIN_COMMAND, TEST_COMMAND]
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci.splitlines()


def test_readme_reaches_patch_model_in_the_first_screens():
    lines = README.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if "tmf.patch_model(" in line)
    assert first < 60


def test_results_folder_holds_the_ledger_and_no_logs():
    folder = ROOT / "benchmarks" / "results"
    files = sorted(p.name for p in folder.iterdir())
    assert "ledger.csv" in files and len(files) <= 6, files
    assert all(p.endswith((".csv", ".md")) for p in files), files
