"""Rebuild the photo folders that measure transfer to photographs the project never ships.

Each folder is a handful of real photographs (no drawings or renders) from one Debian package, fetched
with `apt-get download PACKAGE=VERSION`, unpacked with `dpkg -x` into a temporary folder, checked
file by file against the sha256 below and copied into OUT/<folder>/. None of them is a built-in
photograph (`engine.datasets.photos.default_photos`): the script refuses a file whose bytes or whose
16x16 grey thumbnail match one of those.

    python bench/photo_folders.py OUT [--only mate-nature lomiri plasma]

Roles (bench/RESULTS.md, "Transfer to unseen photo folders"): `mate-nature` is the development folder
the demo's recipe was chosen on; `lomiri` and `plasma` are held out, measured once, never tuned on.
Then `engine demo --photos OUT/<folder> --train regression`. Nothing in the tests or the default job
runs this script (it downloads).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.datasets.photos import SAME_PHOTO, default_photos, thumbnail
from engine.files import sha256_file, write_bytes


@dataclass(frozen=True)
class Folder:
    """A photo folder: the Debian package and version it comes from, the folder inside it, (file, sha256) pairs."""

    package: str
    version: str
    root: str
    files: tuple[tuple[str, str], ...]
    role: str


FOLDERS = {
    "mate-nature": Folder(
        "mate-backgrounds", "1.26.0-1", "usr/share/backgrounds/mate/nature", (
            ("Aqua.jpg", "5c30118205982da441bf7e6a1ada636a8a0be879408140b3148280c665ed6bce"),
            ("Blinds.jpg", "f7aac0dcc2e06d0491643e84df3da1d9db7c4610f58806a880d56e074799f600"),
            ("Dune.jpg", "8a67c2cb0be8c46b70c237311a4fa4d2b4ac7d39568135384787801fa5cc9a91"),
            ("FreshFlower.jpg", "972b0a0c4e5e3fa93f4f244fc84bc64b121a5eac3aaa5856f1308c1f38a02f8e"),
            ("Garden.jpg", "d3095ee09d425ef23d27155412136cf14fc3c9af76ca58b452f55e23da324e78"),
            ("GreenMeadow.jpg", "8fa0de0aa4089f7319c9fb7a6d006d4cab6023e8c8853731557cff53567b4832"),
            ("LadyBird.jpg", "e35a9a4126ef969c90b29c038058c5a575a20eadd84106a37bf1fa9931e7b61d"),
            ("RainDrops.jpg", "3e4ea9671c28c90a86cf67b3db9daf18c4741587c596333a7529ca589aaa0c16"),
            ("Storm.jpg", "77ca53077831d3237f73393a91fc879158abc046d852941c26e90de336356957"),
            ("TwoWings.jpg", "665e5abf8a5399070a91a9a8e455fe071e5b61697ff78fdeda4e9843ef545aeb"),
            ("Wood.jpg", "19c78500ac00a622e19907ab9cc7d06d46fe08c4a6142759a84195696150ec07"),
            ("YellowFlower.jpg", "254da96256acb7add685679775a04d1e4a5bc8cd13e5a5a3d61351ce198a5306"),
        ), "development"),
    # Ubuntu's wallpaper-contest photographs; the package's two renders (umang, analogpattern) are left out.
    "lomiri": Folder(
        "lomiri-wallpapers-16.04", "20.04.0-2", "usr/share/backgrounds", (
            ("Bridge_by_Sander_Klootwijk.jpg", "bd86b081f9975e2b83527f71e49b9271a8ab40885428395969d9f7d834d7f050"),
            ("Dragonfly_by_Bolly.jpg", "af5af17841009732def24b09bb1e669a1b09d2b4bdeee7812c371101c30d2bb3"),
            ("Picture_0B_by_freespace.jpg", "c8c0ab18e48d9e0419fe42881112137f3afafc27dfddc29ec3a6d54c56d225ad"),
            ("Picture_1A_by_freespace.jpg", "89e86af38d04daaef975665dc2127e9fa76f0fd68f4eea105a2d0ae3390b010b"),
            ("Wine_by_Jakkub_Mede.jpg", "d2e96e6d4da40dd804b3d0ce295e94de04a2d7d9b6785d42cd9d92ba58bced74"),
            ("aitzgorri_by_Aitzol_Berasategi.jpg", "66268e7b48f8854d36a28765fac6e23ec1aee251daa6da1f64715f201020ad36"),
            ("free_by_Peter_Nerlich.jpg", "85a5453c2fed514c75973016f3d862aca62eb7ca087618822469274ac1092373"),
            ("friends_by_Aitzol_Berasategi.jpg", "cc40e313c74e421edffe3403def413c16878ce14661cce7ec5915baeab35538d"),
            ("greentock_by_Peter_Nerlich.jpg", "e7b20e2db9dcd6e2b278ca55873c2110b35d89cd38b04d0b18728726888e6889"),
            ("life_by_Aitzol_Berasategi.jpg", "4c119350ead80201fe256850c3d316309ddfb4bdf10b235ce982dcde0c667c05"),
            ("picosdeeuropa_by_Aitzol_Berasategi.jpg", "414d0072b2f6f2c555deafeaef6e45c4fed6fa9ad26eba6560ca8803959cf97a"),
            ("seeding_by_Clements_Engelhardt.jpg", "a5634d1ab5e41a3568e92d4a894a500c92b891f9ff734e50bd224d6e185a605f"),
            ("sunset_by_Aitzol_Berasategi.jpg", "474dab6a4b9f94dc76c29dfe30e9f5db4af0fd2e33fe5d695f8152b371efca18"),
        ), "held out"),
    # KDE Plasma's photographic wallpapers (the renders and drawings of the package are left out).
    "plasma": Folder(
        "plasma-workspace-wallpapers", "4:5.27.5-2", "usr/share/wallpapers", (
            ("BytheWater/contents/images/1920x1080.jpg", "c272434ef39f2abf1ed48a15a8910088020f3165329a5092f3940ec9464bc05f"),
            ("ColdRipple/contents/images/1920x1080.jpg", "05bef6722fc0ed81292cceb3ed026c38d17e510f3c84be7d68610c2b1a723c3f"),
            ("ColorfulCups/contents/images/2560x1600.jpg", "6e0f3a72feb5a4a9fec191b77e34874c3c69e2d93040deb3f07773e73385023d"),
            ("DarkestHour/contents/images/1920x1080.jpg", "8e3703fae3a3c217b1fc2b399b706cd3720584268d071ba153e4809daa55f1ce"),
            ("EveningGlow/contents/images/1920x1080.jpg", "586682dcb362b9f620068f10138f87d0d3649939aef238adc5807cb951976a7a"),
            ("FallenLeaf/contents/images/1920x1080.jpg", "95603a6560c7e8d50e0e03b3f4adbe39c5258c72528e74e4ecaea1daf4e499de"),
            ("Grey/contents/images/1920x1080.jpg", "88c31d8944b7e6935d1b9a296654c692f0772cb512491713eb30a972a604c0ed"),
            ("Kite/contents/images/1920x1080.jpg", "bdca288ce296a981e80659c021cf707caddc702c0c8d4247e60bd618476d47f8"),
            ("OneStandsOut/contents/images/1920x1080.jpg", "cb507baf1dafdcae362264f3aba9483ed4be5f6c9fdd770f0ec0920c6d9e80fd"),
            ("Path/contents/images/1920x1080.jpg", "7477457d7f17b736259f1b021864778ad4ba802cf3214e6728181ff29126bba8"),
            ("summer_1am/contents/images/1920x1080.jpg", "c868b50789591dd42910153c768053f1ba0a98cb36bbfc2b7a96a1045d0477f8"),
        ), "held out"),
}


def unpack(folder: Folder, work: Path) -> Path:
    """apt-get download + dpkg -x of the folder's package into `work`; returns the unpacked root."""
    subprocess.run(["apt-get", "download", "-q", f"{folder.package}={folder.version}"], cwd=work, check=True)
    deb = next(work.glob(f"{folder.package}_*.deb"))
    root = work / "root"
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def file_name(inner: str) -> str:
    """Output name of a file: its own name, or its wallpaper's folder name for Plasma's <name>/contents/images/<size>.jpg."""
    parts = Path(inner).parts
    return f"{parts[0]}{Path(inner).suffix}" if "contents" in parts else parts[-1]


def build(name: str, out: Path, builtin: list[tuple]) -> list[Path]:
    """Write folder `name` into out/name; builtin: (path, sha256, thumbnail) of each built-in photo. Returns the files."""
    folder = FOLDERS[name]
    dest = out / name
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack(folder, Path(tmp)) / folder.root
        for inner, digest in folder.files:
            src = root / inner
            if sha256_file(src) != digest:
                raise SystemExit(f"{src}: sha256 differs from the recorded one ({folder.package} {folder.version})")
            thumb = thumbnail(src)
            for path, sha, t in builtin:
                if sha == digest or float(thumb @ t) > SAME_PHOTO:
                    raise SystemExit(f"{src} looks like the built-in photograph {path}")
            target = dest / file_name(inner)
            write_bytes(target, src.read_bytes())
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write <out>/<folder>/ into")
    parser.add_argument("--only", nargs="+", choices=sorted(FOLDERS), default=sorted(FOLDERS), help="folders to build")
    args = parser.parse_args(argv)
    builtin = [(p, sha256_file(p), thumbnail(p)) for p in default_photos()]
    for name in args.only:
        files = build(name, args.out, builtin)
        f = FOLDERS[name]
        print(f"{args.out / name}: {len(files)} photographs from {f.package} {f.version} ({f.role})")


if __name__ == "__main__":
    sys.exit(main())
