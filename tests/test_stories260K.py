"""The vendored stories260K files are llama2.c's, byte for byte: sizes and sha256 as its README lists them, and the
MIT licence travels with the copy."""

import hashlib
import re

from helpers import STORIES_DIR

ROW = re.compile(r"^\| `([^`]+)` \| ([\d,]+) \| `([0-9a-f]{64})` \|$")


def test_files_match_the_checksums_beside_them():
    rows = {m[1]: (int(m[2].replace(",", "")), m[3]) for line in (STORIES_DIR / "README.md").read_text().splitlines()
            if (m := ROW.match(line))}  # fmt: skip
    assert set(rows) == {"stories260K.bin", "tok512.model", "expected_greedy_200.txt", "LICENSE"}
    for name, (size, digest) in rows.items():
        data = (STORIES_DIR / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest), name
    assert (STORIES_DIR / "LICENSE").read_text().startswith("MIT License")
