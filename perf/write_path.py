"""The hot write path: plain threads with os-level writes against aiofiles, same bytes.

``python -m perf.write_path --mib 512 --files 4``. Each method writes ``files`` files of
``mib / files`` MiB from tensor memory, fsyncs them, and the best of ``--repeat`` is kept.
Used to decide what writes checkpoint files (issue: keep the faster).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import tempfile
import time
from pathlib import Path

import aiofiles
import torch
import xxhash

from async_ckpt.storage import CHUNK, write_file
from perf.common import MiB, bar_plot, machine, write_results


def _views(tensor: torch.Tensor) -> list[memoryview]:
    flat = memoryview(tensor.view(torch.uint8).numpy()).cast("B")
    return [flat[i : i + CHUNK] for i in range(0, len(flat), CHUNK)]


def threads_os_write(root: Path, tensors: list[torch.Tensor]) -> float:
    """With xxh3: what async_ckpt does: one I/O thread per file, FileSink (os.write + xxh3) + fsync + rename."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(tensors)) as pool:
        list(pool.map(lambda it: write_file(root, f"t{it[0]}.bin", lambda sink: sink.write(memoryview(it[1].view(torch.uint8).numpy()))), enumerate(tensors)))
    return time.perf_counter() - started


def threads_plain(root: Path, tensors: list[torch.Tensor]) -> float:
    """One thread per file, os.write of chunks and fsync: no hashing, no rename."""

    def one(item: tuple[int, torch.Tensor]) -> None:
        fd = os.open(root / f"p{item[0]}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for view in _views(item[1]):
                while len(view):
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(tensors)) as pool:
        list(pool.map(one, enumerate(tensors)))
    return time.perf_counter() - started


def aiofiles_write(root: Path, tensors: list[torch.Tensor], hashed: bool = False) -> float:
    """The same files through aiofiles (one coroutine per file, chunked awaits), then fsync.

    ``hashed``: also xxh3 every chunk, in the default executor, as async_ckpt must.
    """

    async def one(index: int, tensor: torch.Tensor) -> None:
        digest = xxhash.xxh3_64()
        loop = asyncio.get_running_loop()
        async with aiofiles.open(root / f"a{index}.bin", "wb") as handle:
            for view in _views(tensor):
                if hashed:
                    await loop.run_in_executor(None, digest.update, view)
                await handle.write(view)
            await handle.flush()
            await asyncio.get_running_loop().run_in_executor(None, os.fsync, handle.fileno())

    async def all_files() -> None:
        await asyncio.gather(*(one(i, t) for i, t in enumerate(tensors)))

    started = time.perf_counter()
    asyncio.run(all_files())
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    tensors = [torch.randn(args.mib * MiB // args.files // 4) for _ in range(args.files)]
    results: dict[str, list[float]] = {"threads_plain_s": [], "aiofiles_plain_s": [], "threads_xxh3_s": [], "aiofiles_xxh3_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            results["threads_plain_s"].append(threads_plain(Path(tmp), tensors))
            results["aiofiles_plain_s"].append(aiofiles_write(Path(tmp), tensors))
            results["threads_xxh3_s"].append(threads_os_write(Path(tmp), tensors))
            results["aiofiles_xxh3_s"].append(aiofiles_write(Path(tmp), tensors, hashed=True))
    best = {k: min(v) for k, v in results.items()}
    table = "\n".join([
        "| method | best of %d | MiB/s |" % args.repeat,
        "|---|---|---|",
        *(f"| {k[:-2]} | {1000 * v:.0f} ms | {args.mib / v:.0f} |" for k, v in best.items()),
        f"| aiofiles / threads, plain | {best['aiofiles_plain_s'] / best['threads_plain_s']:.2f}x | |",
        f"| aiofiles / threads, with xxh3 | {best['aiofiles_xxh3_s'] / best['threads_xxh3_s']:.2f}x | |",
    ])
    print(table)

    def draw(path: Path) -> None:
        bar_plot(path, f"{args.mib} MiB in {args.files} files, write + fsync (best of {args.repeat})", ["plain", "with xxh3"],
                 {"threads (async_ckpt)": [args.mib / best["threads_plain_s"], args.mib / best["threads_xxh3_s"]],
                  "aiofiles": [args.mib / best["aiofiles_plain_s"], args.mib / best["aiofiles_xxh3_s"]]}, "MiB/s")

    write_results(args.out, "write_path", {"machine": machine(), "mib": args.mib, "files": args.files, "runs": results, "best": best}, table, draw)


if __name__ == "__main__":
    main()
