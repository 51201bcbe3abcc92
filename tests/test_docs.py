"""The documentation's code runs: every ```python block of README.md and docs/*.md.

How blocks are run:

* **Each block alone**, in a fresh namespace (``__name__ == "__docs__"``), in a temporary
  working directory, with one torch thread: a reader who copies one block must be able to run
  it as it stands, so a block may not lean on names defined by an earlier one.
* **As written**, except where the line right above its fence says otherwise:

  - ``<!-- no-run: REASON -->``: not run (a torchrun script, an FSDP model, a sketch). The
    reason is required; the blocks not run are counted and listed.
  - ``<!-- docs-test: OLD -> NEW; OLD2 -> NEW2 -->``: run with the literal text OLD replaced by
    NEW (smaller sizes: ``range(20000) -> range(200)``). Each OLD must occur in the block
    exactly once, so a substitution cannot go stale silently. ``CRH_DOCS_AS_WRITTEN=1`` runs
    such blocks unchanged (full sizes; minutes).

* A python block must be fenced as ```python: other spellings (``py``, ``python3``, ``pycon``)
  are refused, so that no block escapes the test by its label.

Tracebacks name the markdown file and its line numbers.
"""
from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_NO_RUN = re.compile(r"^\s*<!--\s*no-run\s*:?\s*(?P<reason>.*?)\s*-->\s*$")
_SMALL = re.compile(r"^\s*<!--\s*docs-test\s*:\s*(?P<subs>.*?)\s*-->\s*$")
_PYTHON_LIKE = {"py", "python3", "py3", "pycon", "ipython", "python-repl"}


@dataclass
class Block:
    path: Path
    line: int                     # 1-based line of the first code line
    code: str
    no_run: Optional[str] = None  # the reason, when marked no-run
    subs: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


class DocsError(ValueError):
    """A block marked wrongly (no reason, a stale substitution, a python block not fenced as
    ```python)."""


def parse_subs(text: str, where: str) -> List[Tuple[str, str]]:
    subs = []
    for part in [p for p in text.split(";") if p.strip()]:
        if " -> " not in part:
            raise DocsError(f"{where}: docs-test substitution {part.strip()!r} is not 'OLD -> NEW'")
        old, new = part.split(" -> ", 1)
        subs.append((old.strip(), new.strip()))
    if not subs:
        raise DocsError(f"{where}: docs-test comment without a substitution")
    return subs


def extract_blocks(path: Path, text: Optional[str] = None) -> List[Block]:
    """Every ```python block of the markdown file ``path`` with its marks."""
    lines = (path.read_text() if text is None else text).splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        lang = info.split()[0].lower() if info else ""
        start = i + 1
        j = start
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and set(lines[j].strip()) == {fence[0]}):
            j += 1
        if j == len(lines):
            raise DocsError(f"{path.name}:{i + 1}: a code fence that is never closed")
        where = f"{path.name}:{i + 1}"
        if lang in _PYTHON_LIKE:
            raise DocsError(f"{where}: fence python blocks as ```python (got {info!r}), so the docs "
                            "test runs them (or mark them <!-- no-run: reason -->)")
        if lang == "python":
            if info != "python":
                raise DocsError(f"{where}: ```{info}: mark a block that is not run with a "
                                "preceding <!-- no-run: reason --> line, nothing after 'python'")
            prev = lines[i - 1] if i > 0 else ""
            block = Block(path, start + 1, textwrap.dedent("\n".join(lines[start:j])))
            nr, sm = _NO_RUN.match(prev), _SMALL.match(prev)
            if nr:
                if not nr.group("reason"):
                    raise DocsError(f"{where}: <!-- no-run --> needs a reason: <!-- no-run: why -->")
                block.no_run = nr.group("reason")
            elif sm:
                block.subs = parse_subs(sm.group("subs"), where)
            elif prev.strip().startswith("<!--") and re.search(r"run|test", prev, re.I):
                raise DocsError(f"{where}: malformed mark {prev.strip()!r}; use <!-- no-run: why --> "
                                "or <!-- docs-test: OLD -> NEW -->")
            blocks.append(block)
        i = j + 1
    return blocks


def prepared_source(block: Block, as_written: bool = False) -> str:
    """The code to run: substitutions applied (each OLD exactly once), padded with blank lines
    so that line numbers in a traceback are the markdown file's."""
    code = block.code
    if not as_written:
        for old, new in block.subs:
            n = code.count(old)
            if n != 1:
                raise DocsError(f"{block.where}: docs-test substitution {old!r} occurs {n} times in "
                                "the block (must be exactly once)")
            code = code.replace(old, new)
    return "\n" * (block.line - 1) + code + "\n"


def run_block(block: Block, as_written: bool = False) -> dict:
    """Run one block in a fresh namespace; returns it. Exceptions propagate (the test fails)."""
    source = prepared_source(block, as_written)
    namespace = {"__name__": "__docs__", "__file__": str(block.path)}
    exec(compile(source, str(block.path), "exec"), namespace)
    return namespace


def _all_blocks() -> List[Block]:
    out = []
    for path in DOC_FILES:
        out += extract_blocks(path)
    return out


BLOCKS = _all_blocks()
RUN = [b for b in BLOCKS if b.no_run is None]
AS_WRITTEN = os.environ.get("CRH_DOCS_AS_WRITTEN") == "1"


@pytest.fixture
def docs_sandbox(tmp_path, monkeypatch):
    """A temporary working directory (blocks may write files), one torch thread, a fixed seed."""
    monkeypatch.chdir(tmp_path)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield tmp_path
    torch.set_num_threads(n)


@pytest.mark.parametrize("block", RUN, ids=[b.where for b in RUN])
def test_doc_block_runs(block, docs_sandbox):
    run_block(block, as_written=AS_WRITTEN)


def test_every_doc_is_read_and_the_skipped_blocks_are_counted_with_reasons():
    names = {p.name for p in DOC_FILES}
    assert {"README.md", "usage.md", "distributed.md", "experiments.md"} <= names
    skipped = [b for b in BLOCKS if b.no_run is not None]
    # the blocks marked no-run, each with its reason: a new one must be added here on purpose
    assert sorted(b.where for b in skipped) == sorted([
        "README.md:" + str(_line_of(ROOT / "README.md", "col = Collector(net); model = DDP(net)")),
        "docs/distributed.md:" + str(_line_of(ROOT / "docs/distributed.md", "# torchrun --nproc-per-node=4 train.py")),
        "docs/distributed.md:" + str(_line_of(ROOT / "docs/distributed.md", "from crh_kernels.distributed import all_reduce_moments")),
        "docs/distributed.md:" + str(_line_of(ROOT / "docs/distributed.md", "from crh_kernels.distributed import full_weight")),
    ]), [(b.where, b.no_run) for b in skipped]
    assert all(len(b.no_run) >= 10 for b in skipped)
    assert len(RUN) >= 4, [b.where for b in RUN]
    print(f"{len(RUN)} doc blocks run, {len(skipped)} not run: "
          + "; ".join(f"{b.where} ({b.no_run})" for b in skipped))


def _line_of(path: Path, needle: str) -> int:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith(needle):
            return i
    raise AssertionError(f"{needle!r} not in {path}")


# ----------------------------------------------------------------------------- the harness itself
def test_a_broken_block_fails_with_the_markdown_line(tmp_path):
    md = tmp_path / "doc.md"
    md.write_text("# title\n\ntext\n\n```python\nx = 1\nundefined_name + x\n```\n")
    (block,) = extract_blocks(md)
    assert block.line == 6
    with pytest.raises(NameError) as info:
        run_block(block)
    tb = info.traceback[-1]
    assert tb.path == md and tb.lineno + 1 == 7   # pytest's lineno is 0-based


def test_blocks_do_not_share_names(tmp_path):
    md = tmp_path / "doc.md"
    md.write_text("```python\nshared = 1\n```\n\n```python\nshared + 1\n```\n")
    first, second = extract_blocks(md)
    run_block(first)
    with pytest.raises(NameError):
        run_block(second)


@pytest.mark.parametrize("text, needle", [
    ("<!-- no-run -->\n```python\nx\n```\n", "needs a reason"),
    ("<!-- no-run: -->\n```python\nx\n```\n", "needs a reason"),
    ("```py\nx\n```\n", "fence python blocks as ```python"),
    ("```python no-run\nx\n```\n", "nothing after 'python'"),
    ("<!-- docs-test: 100 200 -->\n```python\nx\n```\n", "is not 'OLD -> NEW'"),
    ("<!-- no run: why -->\n```python\nx\n```\n", "malformed mark"),
    ("```python\nx\n", "never closed"),
])
def test_marks_are_checked(tmp_path, text, needle):
    md = tmp_path / "doc.md"
    md.write_text(text)
    with pytest.raises(DocsError, match=re.escape(needle)):
        extract_blocks(md)


def test_substitutions_apply_once_and_go_stale_loudly(tmp_path):
    md = tmp_path / "doc.md"
    md.write_text("<!-- docs-test: range(1000) -> range(3) -->\n```python\n"
                  "out = [i for i in range(1000)]\n```\n")
    (block,) = extract_blocks(md)
    assert len(run_block(block)["out"]) == 3
    assert len(run_block(block, as_written=True)["out"]) == 1000
    block.subs = [("range(999)", "range(3)")]
    with pytest.raises(DocsError, match="occurs 0 times"):
        run_block(block)
    block.subs = [("0", "1")]
    with pytest.raises(DocsError, match="occurs 3 times"):
        prepared_source(block)


def test_other_languages_and_indented_fences_are_left_alone(tmp_path):
    md = tmp_path / "doc.md"
    md.write_text("```bash\ncrh run fc1\n```\n\n```\nplain\n```\n\n````markdown\n```python\nx\n```\n````\n")
    assert extract_blocks(md) == []
