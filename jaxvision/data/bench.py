"""Throughput of the host input pipeline for ImageNet-style training augmentation.

    python -m jaxvision.data.bench [--size 224] [--batch 64] [--seconds 10] [--workers 1,2]
                                   [--stages]

Generates JPEGs of 500x375 (the typical ImageNet photo), keeps their bytes in memory (so disk
speed is out of the measurement), and times the training transform on them: JPEG decode,
inception crop, resize to size x size, horizontal flip, ImageNet normalization. Prints one JSON
object per worker-thread count: images/s (wall clock), per thread, and per CPU-second (the
per-core rate, which stays meaningful when other processes share the machine).
"""

from __future__ import annotations

import argparse
import io
import json
import time

import ml_collections
import numpy as np
from PIL import Image

from jaxvision.data.decode import EncodedImage, decode, decode_crop_resize
from jaxvision.data.task_transforms import build_transform
from jaxvision.data.transforms import Normalize, _flip, inception_box, normalization


def synthetic_jpegs(n: int = 64, width: int = 500, height: int = 375, seed: int = 0) -> list[bytes]:
  """`n` photo-like JPEGs (smooth color fields plus fine texture), quality 90."""
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(n):
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    texture = rng.normal(0, 18, (height, width, 1)).astype(np.float32)
    pixels = np.clip(base + texture, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    images.append(buffer.getvalue())
  return images


def measure(jpegs: list[bytes], *, size: int, batch: int, workers: int, seconds: float) -> dict:
  """Images/s of decode + inception crop + flip + normalize with `workers` threads."""
  data = ml_collections.ConfigDict({
      "normalize": "imagenet", "augment": "inception_crop,flip", "workers": workers,
      "skip_bad": False, "eval_crop": 0.875,
  })
  transform = build_transform(data, train=True, task="classification", image_size=size)
  items = [EncodedImage(data=b) for b in jpegs]
  labels = np.zeros(batch, np.int32)
  step, images = 0, 0
  rows_of = lambda s: [items[(s * batch + i) % len(items)] for i in range(batch)]
  transform({"image": rows_of(0), "label": labels}, np.random.default_rng(0))  # warm-up
  start, cpu_start = time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    out = transform({"image": rows_of(step), "label": labels}, np.random.default_rng([0, step]))
    assert out["image"].shape == (batch, size, size, 3)
    step, images = step + 1, images + batch
  elapsed = time.perf_counter() - start
  # CPU time of all threads: images per CPU-second is the per-core rate, and unlike wall time it
  # holds when other processes share the cores.
  cpu = time.process_time() - cpu_start
  return {
      "pipeline": "jpeg decode + inception_crop + flip + normalize (imagenet)",
      "image_size": size, "batch_size": batch, "workers": workers,
      "images_per_sec": round(images / elapsed, 1),
      "images_per_sec_per_worker": round(images / elapsed / workers, 1),
      "images_per_cpu_sec": round(images / cpu, 1),
      "source_jpeg": "500x375, quality 90", "seconds": round(elapsed, 1),
  }


def stage_costs(jpegs: list[bytes], *, size: int, batch: int, repeats: int = 3) -> dict:
  """CPU milliseconds per image of each stage, on one thread."""
  rng = np.random.default_rng(0)
  items = [EncodedImage(data=b) for b in jpegs]
  crops = np.stack([decode_crop_resize(items[i % len(items)], lambda w, h: (0, 0, w, h), size)
                    for i in range(batch)])
  norm = Normalize(*normalization("imagenet"))

  def cpu_ms(fn, count):
    start = time.process_time()
    for _ in range(repeats):
      fn()
    return round(1000 * (time.process_time() - start) / repeats / count, 3)

  return {
      "stage_cpu_ms_per_image": {
          "jpeg_decode_full": cpu_ms(lambda: [decode(i) for i in items], len(items)),
          "decode_inception_crop_resize": cpu_ms(lambda: [
              decode_crop_resize(i, lambda w, h: inception_box(w, h, rng), size) for i in items
          ], len(items)),
          "flip": cpu_ms(lambda: _flip(crops, rng), batch),
          "normalize": cpu_ms(lambda: norm(crops), batch),
      },
      "image_size": size,
  }


def main(argv=None) -> None:
  """Command line entry point: prints one JSON line per worker count."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--workers", default="1,2", help="comma-separated thread counts")
  parser.add_argument("--stages", action="store_true", help="also time each stage on one thread")
  args = parser.parse_args(argv)
  jpegs = synthetic_jpegs()
  if args.stages:
    print(json.dumps(stage_costs(jpegs, size=args.size, batch=args.batch)), flush=True)
  mean_kb = np.mean([len(b) for b in jpegs]) / 1024
  for workers in (int(w) for w in args.workers.split(",")):
    result = measure(jpegs, size=args.size, batch=args.batch, workers=workers, seconds=args.seconds)
    result["mean_jpeg_kb"] = round(float(mean_kb), 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
