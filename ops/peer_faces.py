"""The same MTCNN weights as sieve's face detector, run in ONNX Runtime (issue #24's bench).

Run through ops/peer-faces.sh (ops/peer-ort.sh's virtual environment: onnxruntime, onnx,
numpy, Pillow; no torch); `sieve-tools bench forward --task deidentify --peer ort` calls it.

1. Conversion, without network and without torch: facenet-pytorch's `pnet.pt`, `rnet.pt`
   and `onet.pt` (legacy `torch.save` streams) are read with ops/peer_ort.py's restricted
   unpickler, and the three networks are written with `onnx.helper`: Conv, PRelu, MaxPool
   (ceil mode), Softmax, and for R- and O-Net the original's width-height-channel flatten
   (Transpose 0,3,2,1) before Gemm.
2. The cascade, in NumPy, as sieve's `worker/src/model/mtcnn.rs` and facenet-pytorch's
   `detect_face` run it: the pyramid from 20-pixel faces at factor 0.709, area-averaged
   resizes, NMS per level at 0.5 and across at 0.7, regression and squaring, R-Net (> 0.7),
   O-Net (> 0.7), "Min" NMS at 0.7. Each network runs in an ONNX Runtime session (CPU
   provider, `--threads` intra-op threads, sequential, all graph optimisations).
3. Per photo of the fixture: one warm-up call, then at least `--seconds` and three calls;
   the photo's time (ms), and its faces at or above 0.9 (the face threshold).

Prints one JSON line per photo: `{"photo", "ms", "faces": [[x0, y0, x1, y1, score], ...]}`.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_ort import load_state_dict, measure, session  # noqa: E402

PHOTOS = ["t1.jpg", "astronaut.png", "Tom_Hanks_54745.png", "chelsea.png", "coffee.png", "rocket.jpg"]
THRESHOLDS = (0.6, 0.7, 0.7)
FACE_THRESHOLD = 0.9


def graph(name, state, layers, outputs, side):
    """One network as ONNX bytes. `layers`: (kind, torch name, arguments) in order."""
    nodes, inits = [], []
    x = "input"

    def const(key, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), key))
        return key

    for kind, key, extra in layers:
        out = f"{key}_out"
        if kind == "conv":
            w, b = state[f"{key}.weight"], state[f"{key}.bias"]
            nodes.append(helper.make_node("Conv", [x, const(f"{key}.w", w), const(f"{key}.b", b)], [out]))
        elif kind == "prelu":
            slope = state[f"{key}.weight"]
            shape = (-1, 1, 1) if extra == "map" else (-1,)
            nodes.append(helper.make_node("PRelu", [x, const(f"{key}.a", slope.reshape(shape))], [out]))
        elif kind == "pool":
            nodes.append(helper.make_node("MaxPool", [x], [out], kernel_shape=[extra, extra], strides=[2, 2], ceil_mode=1))
        elif kind == "flatten":
            t = f"{key}_t"
            nodes.append(helper.make_node("Transpose", [x], [t], perm=[0, 3, 2, 1]))
            nodes.append(helper.make_node("Flatten", [t], [out], axis=1))
        elif kind == "dense":
            w, b = state[f"{key}.weight"], state[f"{key}.bias"]
            nodes.append(helper.make_node("Gemm", [x, const(f"{key}.w", w), const(f"{key}.b", b)], [out], transB=1))
        x = out
    trunk = x
    outs = []
    for head, softmax in outputs:
        w, b = state[f"{head}.weight"], state[f"{head}.bias"]
        raw = f"{head}_raw"
        if w.ndim == 4:
            nodes.append(helper.make_node("Conv", [trunk, const(f"{head}.w", w), const(f"{head}.b", b)], [raw]))
        else:
            nodes.append(helper.make_node("Gemm", [trunk, const(f"{head}.w", w), const(f"{head}.b", b)], [raw], transB=1))
        if softmax:
            nodes.append(helper.make_node("Softmax", [raw], [head], axis=1))
        else:
            nodes.append(helper.make_node("Identity", [raw], [head]))
        outs.append(helper.make_tensor_value_info(head, TensorProto.FLOAT, None))
    dims = ["n", 3, "h", "w"] if side is None else ["n", 3, side, side]
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)], outs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def networks(weights_dir, threads):
    load = lambda n: load_state_dict(os.path.join(weights_dir, n))  # noqa: E731
    pnet = graph("pnet", load("pnet.pt"), [
        ("conv", "conv1", None), ("prelu", "prelu1", "map"), ("pool", "pool1", 2),
        ("conv", "conv2", None), ("prelu", "prelu2", "map"),
        ("conv", "conv3", None), ("prelu", "prelu3", "map"),
    ], [("conv4_1", True), ("conv4_2", False)], None)
    rnet = graph("rnet", load("rnet.pt"), [
        ("conv", "conv1", None), ("prelu", "prelu1", "map"), ("pool", "pool1", 3),
        ("conv", "conv2", None), ("prelu", "prelu2", "map"), ("pool", "pool2", 3),
        ("conv", "conv3", None), ("prelu", "prelu3", "map"),
        ("flatten", "flat", None), ("dense", "dense4", None), ("prelu", "prelu4", "vec"),
    ], [("dense5_1", True), ("dense5_2", False)], 24)
    onet = graph("onet", load("onet.pt"), [
        ("conv", "conv1", None), ("prelu", "prelu1", "map"), ("pool", "pool1", 3),
        ("conv", "conv2", None), ("prelu", "prelu2", "map"), ("pool", "pool2", 3),
        ("conv", "conv3", None), ("prelu", "prelu3", "map"), ("pool", "pool3", 2),
        ("conv", "conv4", None), ("prelu", "prelu4", "map"),
        ("flatten", "flat", None), ("dense", "dense5", None), ("prelu", "prelu5", "vec"),
    ], [("dense6_1", True), ("dense6_2", False), ("dense6_3", False)], 48)
    return [session(m, threads) for m in (pnet, rnet, onet)]


def area_resize(img, y0, x0, y1, x1, oh, ow):
    """Adaptive average pooling of img[:, y0:y1, x0:x1] to oh x ow (PyTorch's area mode)."""
    region = img[:, y0:y1, x0:x1]
    h, w = region.shape[1:]

    def pool(a, n, out, axis):
        starts = (np.arange(out) * n) // out
        ends = -((-(np.arange(1, out + 1) * n)) // out)
        c = np.cumsum(a, axis=axis, dtype=np.float64)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
        s = np.take(c, ends, axis=axis) - np.take(c, starts, axis=axis)
        shape = [1] * a.ndim
        shape[axis] = out
        return s / (ends - starts).reshape(shape)

    return pool(pool(region, w, ow, 2), h, oh, 1).astype(np.float32)


def nms(boxes, scores, threshold, minimum=False):
    """Greedy NMS, highest score first, vectorised over the boxes left."""
    order = np.argsort(-scores, kind="stable")
    plus = 1.0 if minimum else 0.0
    area = np.maximum(boxes[:, 2] - boxes[:, 0] + plus, 0) * np.maximum(boxes[:, 3] - boxes[:, 1] + plus, 0)
    keep = []
    while order.size > 0:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]) + plus, 0)
        ih = np.maximum(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]) + plus, 0)
        inter = iw * ih
        den = np.minimum(area[i], area[rest]) if minimum else area[i] + area[rest] - inter
        overlap = np.where(den > 0, inter / np.where(den > 0, den, 1), 0)
        order = rest[overlap <= threshold]
    return np.array(keep, dtype=np.int64)


def square(b):
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    x, y = b[:, 0] + w * 0.5 - side * 0.5, b[:, 1] + h * 0.5 - side * 0.5
    return np.stack([x, y, x + side, y + side], axis=1)


def regress(b, r):
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    return np.stack([b[:, 0] + r[:, 0] * w, b[:, 1] + r[:, 1] * h, b[:, 2] + r[:, 2] * w, b[:, 3] + r[:, 3] * h], axis=1)


def crops(img, boxes, side):
    h, w = img.shape[1:]
    kept, out = [], []
    for i, b in enumerate(np.trunc(boxes).astype(np.int64)):
        x0, y0 = max(b[0], 1) - 1, max(b[1], 1) - 1
        x1, y1 = min(b[2], w), min(b[3], h)
        if x1 > x0 and y1 > y0:
            out.append(area_resize(img, y0, x0, y1, x1, side, side))
            kept.append(i)
    return np.array(kept, dtype=np.int64), np.stack(out) if out else np.zeros((0, 3, side, side), np.float32)


def detect(nets, img):
    pnet, rnet, onet = nets
    scaled = lambda a: (a - 127.5) * 0.0078125  # noqa: E731
    h, w = img.shape[1:]
    scale, shorter, scales = 12 / 20, min(h, w) * 12 / 20, []
    while shorter >= 12:
        scales.append(scale)
        scale *= 0.709
        shorter *= 0.709
    cands, regs, scs = [], [], []
    for s in scales:
        lh, lw = int(h * s + 1), int(w * s + 1)
        level = area_resize(img, 0, 0, h, w, lh, lw)
        probs, reg = pnet.run(None, {"input": scaled(level)[None]})
        face = probs[0, 1]
        ys, xs = np.nonzero(face >= THRESHOLDS[0])
        if len(ys) == 0:
            continue
        b = np.stack([np.floor((2 * xs + 1) / s), np.floor((2 * ys + 1) / s),
                      np.floor((2 * xs + 12) / s), np.floor((2 * ys + 12) / s)], axis=1).astype(np.float32)
        sc = face[ys, xs]
        r = reg[0][:, ys, xs].T
        keep = nms(b, sc, 0.5)
        cands.append(b[keep]); regs.append(r[keep]); scs.append(sc[keep])
    if not cands:
        return []
    b, r, sc = np.concatenate(cands), np.concatenate(regs), np.concatenate(scs)
    keep = nms(b, sc, 0.7)
    b, r = b[keep], r[keep]
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    b = square(np.stack([b[:, 0] + r[:, 0] * bw, b[:, 1] + r[:, 1] * bh, b[:, 2] + r[:, 2] * bw, b[:, 3] + r[:, 3] * bh], axis=1))
    idx, x = crops(img, b, 24)
    if len(idx) == 0:
        return []
    probs, reg = rnet.run(None, {"input": scaled(x)})
    ok = probs[:, 1] > THRESHOLDS[1]
    b, sc, r = b[idx][ok], probs[ok, 1], reg[ok]
    keep = nms(b, sc, 0.7)
    b = square(regress(b[keep], r[keep]))
    idx, x = crops(img, b, 48)
    if len(idx) == 0:
        return []
    probs, reg, _points = onet.run(None, {"input": scaled(x)})
    ok = probs[:, 1] > THRESHOLDS[2]
    b, sc, r = b[idx][ok], probs[ok, 1], reg[ok]
    b = regress(b, r)
    keep = nms(b, sc, 0.7, minimum=True)
    return [[float(v) for v in b[k]] + [float(sc[k])] for k in keep]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--weights-dir", default="ops/weights/mtcnn")
    parser.add_argument("--photos-dir", default="ops/test-photos")
    args = parser.parse_args()
    nets = networks(args.weights_dir, args.threads)
    for photo in PHOTOS:
        path = os.path.join(args.photos_dir, photo)
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1).copy()
        faces = detect(nets, img)
        rate = measure(args.seconds, 1, lambda: detect(nets, img))
        print(json.dumps({
            "photo": photo,
            "ms": 1000.0 / rate,
            "faces": [f for f in faces if f[4] >= FACE_THRESHOLD],
        }), flush=True)


if __name__ == "__main__":
    main()
