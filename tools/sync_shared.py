"""Copy every shared block of one algorithm file into the other algorithm files that have the same block.

Usage: python tools/sync_shared.py algorithms/so2.py   (edit the block in one file, then run this)

Blocks sit between `# >>> shared: <name>` and `# <<< shared: <name>` lines; tests/test_shared_blocks.py checks
that they stay byte-identical.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^# >>> shared: (\w+)\n(.*?)^# <<< shared: \1\n", re.S | re.M)


def blocks(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in BLOCK.finditer(text)}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    source = Path(sys.argv[1])
    shared = blocks(source.read_text())
    for path in sorted((ROOT / "algorithms").glob("*.py")):
        if path.resolve() == source.resolve():
            continue
        text = path.read_text()
        new = BLOCK.sub(lambda m: f"# >>> shared: {m.group(1)}\n{shared.get(m.group(1), m.group(2))}"
                                  f"# <<< shared: {m.group(1)}\n", text)
        if new != text:
            path.write_text(new)
            print(f"updated {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
