"""An object detector made from synthetic data: a tiny YOLO-shaped network trained briefly on generated
images of coloured shapes, exported to ONNX with Ultralytics-style metadata, ready to pack and serve.

    pip install -e '.[onnx,torch,vision]'
    python examples/detector.py --out /tmp/shapes --pack        # about a minute on 2 CPU cores
    modelpod serve shapes --port 8080                            # the metadata makes it a detector
    curl -s localhost:8080/v2/models/shapes/infer -d '{"inputs": [{"name": "images", "datatype": "BYTES",
      "shape": [1], "data": ["'"$(base64 -w0 /tmp/shapes/sample.jpg)"'"]}]}'
    modelpod predict shapes --image /tmp/shapes/sample.jpg --annotate /tmp/shapes/boxes.png
    modelpod build shapes --output docker-archive:/tmp/shapes/image.tar --tag shapes:1   # then docker load

Writes ``shapes.onnx`` (input ``images`` [batch, 3, 128, 128], output [batch, 7, 256]: the YOLOv8
layout, centre boxes and three class scores), ``sample.jpg`` and ``sample.json`` (where its shapes
really are). Classes: red squares, green circles, blue triangles. Seeded: the same run gives the
same weights. The network: 3x3 convolutions with SiLU down to stride 16, the stride-16 features
upsampled and joined to the stride-8 ones, and a 1x1 head predicting, for each stride-8 cell,
the distances to the box's four sides and the class scores (anchor-free, as YOLOv8).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

NAMES = ("square", "circle", "triangle")
COLOURS = ((220, 40, 40), (40, 190, 60), (40, 70, 220))  # class i is drawn in COLOURS[i], jittered
IMGSZ = 128  # the network's input (height = width)
STRIDE = 8  # the head's cell size
WIDTHS = (16, 24, 32, 48, 48, 48)  # conv1..conv5 and the head's 3x3 conv
SEED = 0


# -- data ----------------------------------------------------------------------------------------------
def scene(rng: np.random.Generator, width: int, height: int, count: int | None = None
          ) -> tuple[np.ndarray[Any, Any], list[tuple[int, tuple[int, int, int, int]]]]:
    """A ``height x width`` RGB image with 1-4 shapes that do not overlap, and their (class, box):
    boxes in pixel edges (x1, y1, x2, y2), x2 and y2 one past the last pixel."""
    from PIL import Image, ImageDraw

    base = rng.integers(90, 250, 3)
    im = Image.new("RGB", (width, height), tuple(int(c) for c in base))
    draw = ImageDraw.Draw(im)
    placed: list[tuple[int, tuple[int, int, int, int]]] = []
    side = min(width, height)
    for _ in range(count or int(rng.integers(1, 5))):
        for _try in range(30):
            size = int(rng.integers(int(side * 0.2), int(side * 0.45) + 1))
            x1, y1 = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
            box = (x1, y1, x1 + size, y1 + size)
            if all(_apart(box, other) for _, other in placed):
                break
        else:
            continue
        cls = int(rng.integers(0, len(NAMES)))
        colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[cls])
        x1, y1, x2, y2 = box
        if cls == 0:
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
        elif cls == 1:
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=colour)
        else:
            draw.polygon(((x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)), fill=colour)
        placed.append((cls, box))
    img = np.asarray(im, dtype=np.int16) + rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8), placed


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    gap = 4
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


Targets = list[list[tuple[int, np.ndarray[Any, Any]]]]  # per image: (class, box x1, y1, x2, y2)


def batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray[Any, Any], Targets]:
    """``n`` scenes of random sizes letterboxed to the input exactly as the server does (so grey bands
    are nothing), as NCHW float32 in [0, 1]; and their (class, box in input pixels)."""
    from modelpod.vision.image import letterbox, to_tensor

    images, targets = [], []
    for _ in range(n):
        img, shapes = scene(rng, int(rng.integers(100, 221)), int(rng.integers(100, 221)))
        boxed, lb = letterbox(img, (IMGSZ, IMGSZ))
        images.append(boxed)
        targets.append([(c, np.asarray(b, np.float32) * lb.ratio + [lb.left, lb.top, lb.left, lb.top])
                        for c, b in shapes])
    return to_tensor(images), targets


# -- the network ---------------------------------------------------------------------------------------
def network(widths: Sequence[int] = WIDTHS) -> Any:
    """The untrained network (``widths``: the channels of conv1..conv5 and of the head's 3x3 conv)."""
    import torch
    from torch import nn

    class Shapes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = widths
            self.c1 = nn.Conv2d(3, c[0], 3, 2, 1)
            self.c2 = nn.Conv2d(c[0], c[1], 3, 2, 1)
            self.c3 = nn.Conv2d(c[1], c[2], 3, 2, 1)  # stride 8
            self.c4 = nn.Conv2d(c[2], c[3], 3, 2, 1)  # stride 16
            self.c5 = nn.Conv2d(c[3], c[4], 3, 1, 1)
            self.c6 = nn.Conv2d(c[4] + c[2], c[5], 3, 1, 1)  # after joining the upsampled stride-16 features
            self.head = nn.Conv2d(c[5], 4 + len(NAMES), 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            act = nn.functional.silu
            x = act(self.c2(act(self.c1(x))))
            p8 = act(self.c3(x))
            p16 = act(self.c5(act(self.c4(p8))))
            up = nn.functional.interpolate(p16, scale_factor=2.0, mode="nearest")
            return self.head(act(self.c6(torch.cat([up, p8], 1))))  # [B, 4+nc, H/8, W/8], raw

    return Shapes()


def anchors(size: int = IMGSZ) -> np.ndarray[Any, Any]:
    """Cell centres in input pixels, [2, N], row-major (as the head's output flattens)."""
    cells = size // STRIDE
    ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    return np.stack([xs.reshape(-1), ys.reshape(-1)]).astype(np.float32) * STRIDE + STRIDE / 2


def assign(targets: Targets) -> tuple[Any, Any, Any]:
    """Training targets per cell: class one-hots [B, nc, N], side distances in cells [B, 4, N] and the
    positive mask [B, N]. A cell is positive for a box when its centre lies in the box's middle half
    (or it holds the box's centre)."""
    import torch

    grid = anchors()
    n = grid.shape[1]
    cls = np.zeros((len(targets), len(NAMES), n), np.float32)
    dist = np.zeros((len(targets), 4, n), np.float32)
    pos = np.zeros((len(targets), n), bool)
    for i, shapes in enumerate(targets):
        for c, (x1, y1, x2, y2) in shapes:
            cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 4, (y2 - y1) / 4
            inside = (np.abs(grid[0] - cx) <= hw) & (np.abs(grid[1] - cy) <= hh)
            inside[int(cy // STRIDE) * (IMGSZ // STRIDE) + int(cx // STRIDE)] = True
            cls[i, c, inside] = 1.0
            dist[i, :, inside] = np.stack([grid[0] - x1, grid[1] - y1, x2 - grid[0], y2 - grid[1]],
                                          axis=1)[inside] / STRIDE
            pos[i, inside] = True
    return torch.from_numpy(cls), torch.from_numpy(dist), torch.from_numpy(pos)


def train(steps: int = 300, batch_size: int = 16, seed: int = SEED, log: bool = False,
          widths: Sequence[int] = WIDTHS) -> Any:
    """The network trained on freshly generated scenes (Adam; class BCE plus L1 on the side distances)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = network(widths)
    opt = torch.optim.Adam(net.parameters(), lr=4e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps, pct_start=0.15)
    for step in range(steps):
        images, targets = batch(rng, batch_size)
        cls, dist, pos = assign(targets)
        out = net(torch.from_numpy(images)).flatten(2)  # [B, 4+nc, N]
        raw_box, raw_cls = out[:, :4], out[:, 4:]
        n_pos = pos.sum().clamp(min=1)
        cls_loss = torch.nn.functional.binary_cross_entropy_with_logits(raw_cls, cls, reduction="sum") / n_pos
        sides = torch.nn.functional.softplus(raw_box).permute(0, 2, 1)[pos]
        box_loss = (sides - dist.permute(0, 2, 1)[pos]).abs().sum() / n_pos
        loss = cls_loss + box_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f} (classes {cls_loss.item():.3f}, boxes {box_loss.item():.3f})")
    return net.eval()


# -- ONNX, written from the trained weights -------------------------------------------------------------
def export(net: Any, path: Path, size: int = IMGSZ) -> Path:
    """The network as ONNX (opset 17) with the YOLOv8 output decoding ([B, 4+nc, N]: cx, cy, w, h in
    input pixels, then class probabilities) and the metadata keys Ultralytics writes, as it writes
    them (``str()`` of each value). ``size``: the input's height and width (any multiple of 16)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []

    def const(name: str, value: np.ndarray[Any, Any]) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(kind: str, inputs: Sequence[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    def conv(x: str, name: str, stride: int, silu: bool = True) -> str:
        layer = getattr(net, name)
        w = const(f"{name}.weight", layer.weight.detach().numpy())
        b = const(f"{name}.bias", layer.bias.detach().numpy())
        k = layer.kernel_size[0]
        y = node("Conv", [x, w, b], f"{name}_out", kernel_shape=[k, k], strides=[stride, stride],
                 pads=[k // 2] * 4)
        return node("Mul", [y, node("Sigmoid", [y], f"{name}_sig")], f"{name}_act") if silu else y

    x = conv(conv("images", "c1", 2), "c2", 2)
    p8 = conv(x, "c3", 2)
    p16 = conv(conv(p8, "c4", 2), "c5", 1)
    up = node("Resize", [p16, "", const("up_scales", np.asarray([1, 1, 2, 2], np.float32))], "up",
              mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    head = conv(conv(node("Concat", [up, p8], "joined", axis=1), "c6", 1), "head", 1, silu=False)
    nc = len(NAMES)
    flat = node("Reshape", [head, const("flat_shape", np.asarray([0, 4 + nc, -1], np.int64))], "flat")
    nodes.append(helper.make_node("Split", [flat, const("split", np.asarray([2, 2, nc], np.int64))],
                                  ["lt_raw", "rb_raw", "cls_raw"], axis=1))
    px = const("stride", np.asarray(STRIDE, np.float32))
    lt = node("Mul", [node("Softplus", ["lt_raw"], "lt_cells"), px], "lt")
    rb = node("Mul", [node("Softplus", ["rb_raw"], "rb_cells"), px], "rb")
    half = const("half", np.asarray(0.5, np.float32))
    centre = node("Add", [const("anchors", anchors(size)[None]), node("Mul", [node("Sub", [rb, lt], "d"), half],
                                                                        "shift")], "centre")
    node("Concat", [centre, node("Add", [lt, rb], "wh"), node("Sigmoid", ["cls_raw"], "scores")], "output0", axis=1)
    n = (size // STRIDE) ** 2
    graph = helper.make_graph(
        nodes, "shapes",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + nc, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelpod-example")
    model.ir_version = 8
    metadata = {
        "description": "Tiny shapes detector (modelpod example, trained on synthetic images)",
        "author": "modelpod examples",
        "date": "2026-01-01T00:00:00",  # fixed, so the same run gives the same file
        "version": "example",
        "license": "Apache-2.0",
        "docs": "docs/vision.md",
        "stride": 16,  # the network's largest stride, as Ultralytics records int(max(model.stride))
        "task": "detect",
        "batch": 1,
        "imgsz": [size, size],
        "names": dict(enumerate(NAMES)),
        "args": {"batch": 1, "half": False, "dynamic": True, "simplify": False, "opset": 17, "nms": False},
        "channels": 3,
        "end2end": False,
    }
    for key, value in metadata.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, str(value)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def sample(out: Path, seed: int = 2026) -> tuple[Path, list[dict[str, Any]]]:
    """A fresh 200x150 JPEG with three shapes (one of each class) and where they are."""
    from PIL import Image

    img, shapes = scene(np.random.default_rng(seed), 200, 150, count=3)
    path = out / "sample.jpg"
    Image.fromarray(img).save(path, quality=92)
    truth = [{"class_name": NAMES[c], "box": list(b)} for c, b in shapes]
    (out / "sample.json").write_text(json.dumps(truth, indent=1) + "\n")
    return path, truth


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "shapes",
                        help="output directory (default examples/out/shapes)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (16 scenes each)")
    parser.add_argument("--imgsz", type=int, default=IMGSZ, help="input size of the exported model (multiple of 16)")
    parser.add_argument("--pack", action="store_true", help="pack it as `shapes` (an Ultralytics export to modelpod)")
    parser.add_argument("--name", default="shapes")
    parser.add_argument("--home", help="store directory")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    net = train(args.steps, log=True)
    model = export(net, args.out / "shapes.onnx", args.imgsz)
    image, truth = sample(args.out)
    print(f"wrote {model} and {image}: {', '.join(t['class_name'] + ' at ' + str(t['box']) for t in truth)}")
    if args.pack:
        from modelpod.cli import main as cli

        home = ["--home", args.home] if args.home else []
        return cli([*home, "pack", str(model), "--name", args.name])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
