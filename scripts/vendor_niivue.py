"""Vendor NiiVue's browser bundle into the package (run by hand when the pin changes; needs npm and the registry).

    python scripts/vendor_niivue.py            # fetch the pinned tarball, check its integrity, copy the bundle
    python scripts/vendor_niivue.py --check    # only check that the vendored file is the pinned one

`npm pack` fetches the tarball; its sha512 must equal the integrity pinned below (npm's `dist.integrity`, as
`npm view @niivue/niivue@<version> dist.integrity` prints it), else nothing is copied. The UMD bundle defines
`window.niivue` and needs no other file, so `maisi serve` shows volumes offline.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.69.0"
INTEGRITY = "sha512-YMjQvJgD1W2b7DuoxkwlC4VxbrgIePRJ5qyQzXKxi2v2MBVg285P/CIQyg46oDDGDIcaNlbd+MhtO/edMbXJkA=="
BUNDLE = "package/dist/niivue.umd.js"  # the browser bundle inside the tarball
LICENSE = "BSD-2-Clause"  # package.json's license; the tarball has no LICENSE file
TARGET = Path(__file__).resolve().parents[1] / "src" / "maisi" / "service" / "web" / "vendor"


def integrity(data: bytes) -> str:
    """npm's Subresource-Integrity string of a tarball."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch(work: Path) -> Path:
    """`npm pack` the pinned version into `work`; answers the tarball's path."""
    out = subprocess.run(["npm", "pack", f"@niivue/niivue@{VERSION}", "--json", "--pack-destination", str(work)],
                         check=True, capture_output=True, text=True).stdout
    return work / json.loads(out)[0]["filename"]


def vendor(tarball: Path) -> dict:
    got = integrity(tarball.read_bytes())
    if got != INTEGRITY:
        raise SystemExit(f"{tarball.name}: integrity {got} is not the pinned {INTEGRITY}; nothing copied")
    with tarfile.open(tarball) as tar:
        bundle = tar.extractfile(BUNDLE).read()
        version = json.load(tar.extractfile("package/package.json"))["version"]
    if version != VERSION:
        raise SystemExit(f"the tarball holds niivue {version}, not {VERSION}")
    TARGET.mkdir(parents=True, exist_ok=True)
    (TARGET / "niivue.umd.js").write_bytes(bundle)
    record = {"package": "@niivue/niivue", "version": VERSION, "license": LICENSE, "integrity": INTEGRITY,
              "file": "niivue.umd.js", "from": BUNDLE.removeprefix("package/"),
              "sha256": hashlib.sha256(bundle).hexdigest()}
    (TARGET / "VENDOR.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def check() -> None:
    record = json.loads((TARGET / "VENDOR.json").read_text())
    digest = hashlib.sha256((TARGET / record["file"]).read_bytes()).hexdigest()
    if record["version"] != VERSION or record["integrity"] != INTEGRITY or digest != record["sha256"]:
        raise SystemExit(f"{TARGET} does not hold niivue {VERSION} as pinned; run scripts/vendor_niivue.py")
    print(f"niivue {VERSION} vendored, sha256 {digest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the vendored file against the pin")
    if parser.parse_args().check:
        return check()
    if shutil.which("npm") is None:
        sys.exit("npm is needed (it fetches the tarball from the npm registry)")
    with tempfile.TemporaryDirectory() as work:
        record = vendor(fetch(Path(work)))
    print(f"vendored niivue {record['version']} ({record['integrity']}) into {TARGET}")


if __name__ == "__main__":
    main()
