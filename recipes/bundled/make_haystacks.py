"""Build the two held-out evaluation haystacks shipped in src/longmoe/data/haystacks/ (run once; the outputs are
committed). Both come from Debian's perl-modules-5.36 package, which the bundled model never sees in training
(it trains on Python's documentation and standard library), with Debian's own Perl modules (perl5):

- perl-docs.txt.gz: English prose, the documentation paragraphs of Perl's core modules (POD rendered by pod2text,
  code examples and headings dropped), one paragraph per line;
- perl-code.txt.gz: Perl source code of the same modules with the POD removed, file after file.

    python recipes/bundled/make_haystacks.py [PERL_LIB_DIR ...]   (default: /usr/share/perl/5.36.0 /usr/share/perl5)
"""

import gzip
import re
import subprocess
import sys
from pathlib import Path

LIMIT = 1_600_000  # characters per haystack: more than a 1M-token (byte-level) context
roots = [Path(p) for p in sys.argv[1:]] or [Path("/usr/share/perl/5.36.0"), Path("/usr/share/perl5")]
out = Path(__file__).resolve().parents[2] / "src" / "longmoe" / "data" / "haystacks"
out.mkdir(parents=True, exist_ok=True)
files = [(r, f) for r in roots for f in sorted(r.rglob("*")) if f.suffix in (".pm", ".pod") and f.is_file()]

prose: list[str] = []
size = 0
for _, f in files:
    text = subprocess.run(["pod2text", str(f)], capture_output=True, text=True, errors="replace").stdout
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        # pod2text indents body text by 4 spaces and verbatim code by 6 or more; headings are not indented
        if not lines or not all(ln.startswith("    ") and not ln.startswith("      ") for ln in lines):
            continue
        p = " ".join(ln.strip() for ln in lines)
        if len(p) < 40 or not p[0].isalpha() or p[-1] not in ".:;!?)" or "magic" in p.lower():
            continue
        prose.append(p)
        size += len(p) + 1
    if size > LIMIT:
        break

code: list[str] = []
size = 0
for root, f in files:
    if f.suffix != ".pm":
        continue
    text = f.read_text(errors="replace")
    text = re.sub(r"^=[a-zA-Z].*?(^=cut\b.*?$|\Z)", "", text, flags=re.M | re.S)  # drop POD blocks
    text = text.split("\n__END__")[0].strip()
    if "magic" in text.lower() or len(text) < 200:
        continue
    code.append(f"# file: {f.relative_to(root)}\n{text}\n")
    size += len(code[-1])
    if size > LIMIT:
        break

for name, parts in (("perl-docs.txt.gz", prose), ("perl-code.txt.gz", code)):
    data = "\n".join(parts).encode()
    with gzip.GzipFile(out / name, "wb", mtime=0) as g:  # mtime 0: byte-identical rebuilds
        g.write(data)
    print(f"{out / name}: {len(data):,} bytes, {len(parts):,} {'paragraphs' if 'docs' in name else 'files'}")
