"""Turn git copies of Imagenette and Tiny-ImageNet-200 into image folders for ``dataset=imagefolder`` (once).

    python scripts/prepare_dev_data.py [--imagenette GIT_DIR] [--tiny GIT_DIR] [--out DIR]

``--imagenette``: a git directory (bare or not) of github.com/thunderInfy/imagenette (train/<wnid>/*.JPEG,
val/<wnid>/*.JPEG: 10 classes, 9,469 / 3,925 images). ``--tiny``: one of github.com/rangeetpan/IMagenet
(tiny-imagenet-200/ in the original layout, plus two stray classes). ``--out`` defaults to ``$KDRUN_DEV_CACHE``
or ``~/.cache/kdrun-dev``. Gives

    OUT/imagenette/{train,val}/<wnid>/*.JPEG
    OUT/tiny-imagenet-200/{train,val}/<wnid>/*.JPEG   (val from val/val_annotations.txt; no test split: unlabelled)

Tiny-ImageNet keeps the 200 classes of the official release: the copy's extra n02480855 and n10148035 are left
out (with their lines of wnids.txt and val_annotations.txt), so 100,000 / 10,000 images. Files are read with
``git archive`` (nothing is checked out) and written under ``DEST.tmp<pid>``, renamed when complete: never half
done. Existing outputs are kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

DEV_CACHE = os.environ.get("KDRUN_DEV_CACHE", str(Path.home() / ".cache" / "kdrun-dev"))  # outside the repository
TINY_EXTRA = ("n02480855", "n10148035")  # in the git copy, not in the official 200-class release


def _git_dir(path: str) -> str:
    """``path`` itself when it is a bare repository, else its ``.git``."""
    return os.path.join(path, ".git") if os.path.isdir(os.path.join(path, ".git")) else path


def archive_members(git_dir: str, prefix: str) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of every file under ``prefix`` in HEAD of ``git_dir``, streamed from ``git archive``."""
    cmd = ["git", "--git-dir", _git_dir(git_dir), "archive", "--format=tar", "HEAD", prefix]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        with tarfile.open(fileobj=p.stdout, mode="r|") as tar:
            for m in tar:
                if m.isfile():
                    f = tar.extractfile(m)
                    assert f is not None
                    yield m.name, f.read()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit code {p.returncode}")


def write_folder(dest: str, files: Iterator[tuple[str, bytes]], place: Callable[[str], str | None]) -> dict:
    """Write each file at ``place(path)`` (None: skipped) under ``dest``, atomically; image counts per split."""
    if os.path.isdir(dest):
        print(f"{dest}: exists, kept")
        return {}
    tmp = f"{dest}.tmp{os.getpid()}"
    counts: dict[str, int] = {}
    for path, data in files:
        rel = place(path)
        if rel is None:
            continue
        out = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as fh:
            fh.write(data)
        split = rel.split("/")[0]
        counts[split] = counts.get(split, 0) + 1
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return counts


def imagenette(git_dir: str, out: str) -> dict:
    """OUT/imagenette: the copy's train/ and val/ folders as they are (JPEG files only)."""

    def place(path: str) -> str | None:
        parts = path.split("/")
        ok = len(parts) == 3 and parts[0] in ("train", "val") and parts[2].upper().endswith(".JPEG")
        return path if ok else None

    files = (m for prefix in ("train", "val") for m in archive_members(git_dir, prefix))
    return write_folder(os.path.join(out, "imagenette"), files, place)


def tiny_imagenet(git_dir: str, out: str) -> dict:
    """OUT/tiny-imagenet-200: train/<wnid>/images/*.JPEG -> train/<wnid>/; val/images/* -> val/<wnid>/."""
    root = "tiny-imagenet-200"
    show = ["git", "--git-dir", _git_dir(git_dir), "show"]
    wnids = subprocess.run([*show, f"HEAD:{root}/wnids.txt"], capture_output=True, text=True, check=True).stdout
    keep = [w for w in wnids.split() if w not in TINY_EXTRA]
    ann = subprocess.run(
        [*show, f"HEAD:{root}/val/val_annotations.txt"], capture_output=True, text=True, check=True
    ).stdout
    val_class = {}
    for line in ann.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[1] not in TINY_EXTRA:
            val_class[fields[0]] = fields[1]
    wanted = set(keep)

    def place(path: str) -> str | None:
        parts = path.split("/")  # tiny-imagenet-200/train/<wnid>/images/<f>, tiny-imagenet-200/val/images/<f>
        if not parts[-1].upper().endswith(".JPEG"):
            return None
        if len(parts) == 5 and parts[1] == "train" and parts[3] == "images" and parts[2] in wanted:
            return f"train/{parts[2]}/{parts[4]}"
        if len(parts) == 4 and parts[1] == "val" and parts[2] == "images" and parts[3] in val_class:
            return f"val/{val_class[parts[3]]}/{parts[3]}"
        return None

    files = (m for split in ("train", "val") for m in archive_members(git_dir, f"{root}/{split}"))
    counts = write_folder(os.path.join(out, root), files, place)
    if counts:  # the class list and annotations without the two extra classes, next to the folders
        dest = os.path.join(out, root)
        Path(dest, "wnids.txt").write_text("".join(f"{w}\n" for w in keep))
        lines = [ln for ln in ann.splitlines() if ln.split("\t")[1:2] and ln.split("\t")[1] not in TINY_EXTRA]
        Path(dest, "val_annotations.txt").write_text("".join(f"{ln}\n" for ln in lines))
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--imagenette", help="git directory of github.com/thunderInfy/imagenette")
    p.add_argument("--tiny", help="git directory of github.com/rangeetpan/IMagenet")
    p.add_argument("--out", default=DEV_CACHE)
    a = p.parse_args()
    if not (a.imagenette or a.tiny):
        p.error("give --imagenette and/or --tiny")
    os.makedirs(a.out, exist_ok=True)
    if a.imagenette:
        print("imagenette:", os.path.join(a.out, "imagenette"), imagenette(a.imagenette, a.out))
    if a.tiny:
        print("tiny-imagenet-200:", os.path.join(a.out, "tiny-imagenet-200"), tiny_imagenet(a.tiny, a.out))


if __name__ == "__main__":
    main()
