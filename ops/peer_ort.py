"""The same MobileNetV2 ImageNet weights as sieve's worker, run in ONNX Runtime (issue #26).

Run through ops/peer-ort.sh, which makes the virtual environment; `sieve-tools bench forward
--peer ort` calls that script and compares its figures with sieve's own, row by row.

1. Conversion, without network and without torch: torchvision's `.pth` (the legacy
   `torch.save` stream or the zip format) is read with a restricted unpickler into NumPy
   arrays, and torchvision's MobileNetV2 graph is written with `onnx.helper`. Every
   BatchNorm (eps 1e-5, torchvision's default) is folded into the convolution before it, so
   the graph has no BatchNormalization node; ReLU6 is `Clip(0, 6)`. Outputs: `logits`
   ([batch, 1000]) and `embedding` ([batch, 1280], the pooled features sieve's
   `MobileNetV2::features` returns). The file is checked against the same float64
   reference logits as worker/tests/it/mobilenet_import.rs before it is used.
2. Throughput: an ONNX Runtime session (CPU provider, `--threads` intra-op threads, one
   inter-op thread, sequential execution, all graph optimisations) on the graph cut at
   `embedding` (what sieve's bench times), per input side and batch size, one warm-up run
   then at least `--seconds` and three runs, as sieve's `measure`. With `--serve` the rows
   are the ones asked for on stdin, one at a time, so that sieve's bench can alternate its
   rows with ORT's.
3. Top-1: the ImageNet class of each real photo, from the full graph.

Prints JSON lines on stdout (`{"ort": ...}` once, `{"input", "batch", "img_per_s"}` per row,
`{"photo", "top1", "p"}` per photo); human notes go to stderr.
"""

import argparse
import io
import json
import os
import pickle
import sys
import time
import zipfile

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BN_EPSILON = 1e-5
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# (expansion t, output channels c, repeats n, stride s) of torchvision's MobileNetV2.
STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"]

# ------------------------------------------------------------------ reading the .pth

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class Storage:
    """A storage whose bytes may arrive after the pickle (legacy format)."""

    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.array = dtype, numel, None


class LazyTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def numpy(self):
        flat = self.storage.array
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=tuple(self.size),
            strides=tuple(s * item for s in self.stride),
        )
        return np.ascontiguousarray(view)


def rebuild_tensor_v2(storage, offset, size, stride, *_rest):
    return LazyTensor(storage, offset, size, stride)


class StateDictUnpickler(pickle.Unpickler):
    """Resolves only what a plain state dict needs: no other global can be built."""

    def __init__(self, stream, storages):
        super().__init__(stream)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a state dict")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if key not in self.storages:
            self.storages[key] = Storage(kind.dtype, numel)
        return self.storages[key]


def load_state_dict(path):
    """torchvision's state dict as {name: np.ndarray}."""
    storages = {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pkl = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
            prefix = pkl[: -len("data.pkl")]
            state = StateDictUnpickler(io.BytesIO(z.read(pkl)), storages).load()
            for key, storage in storages.items():
                raw = z.read(f"{prefix}data/{key}")
                storage.array = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    else:
        with open(path, "rb") as f:
            # The legacy stream: magic number, protocol version, system info, the pickle,
            # the storage keys, then each storage as an int64 element count and its bytes.
            for _ in range(3):
                pickle.Unpickler(f).load()
            state = StateDictUnpickler(f, storages).load()
            keys = pickle.Unpickler(f).load()
            for key in keys:
                storage = storages[str(key)]
                numel = int(np.frombuffer(f.read(8), dtype="<i8")[0])
                raw = f.read(numel * storage.dtype.itemsize)
                storage.array = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    return {name: tensor.numpy() for name, tensor in state.items()}


# ------------------------------------------------------------------ the ONNX graph


class Graph:
    def __init__(self, state):
        self.state, self.nodes, self.inits, self.used = state, [], [], set()

    def take(self, name):
        self.used.add(name)
        return self.state[name].astype(np.float64)

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv_bn(self, x, conv, bn, stride, groups, relu6, out):
        """Convolution (no bias) with the BatchNorm after it folded in: w' = w * g / s,
        b' = beta - mean * g / s, s = sqrt(var + eps)."""
        w = self.take(f"{conv}.weight")
        gamma, beta = self.take(f"{bn}.weight"), self.take(f"{bn}.bias")
        mean, var = self.take(f"{bn}.running_mean"), self.take(f"{bn}.running_var")
        self.used.add(f"{bn}.num_batches_tracked")
        scale = gamma / np.sqrt(var + BN_EPSILON)
        w = self.const(f"{out}.w", w * scale[:, None, None, None])
        b = self.const(f"{out}.b", beta - mean * scale)
        k = self.state[f"{conv}.weight"].shape[-1]
        pad = (k - 1) // 2
        y = out if not relu6 else f"{out}.pre"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w, b],
                [y],
                name=f"{out}.conv",
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
                group=groups,
            )
        )
        if relu6:
            self.nodes.append(
                helper.make_node("Clip", [y, "zero", "six"], [out], name=f"{out}.relu6")
            )
        return out


def build_onnx(state):
    g = Graph(state)
    g.const("zero", np.array(0.0))
    g.const("six", np.array(6.0))
    x = g.conv_bn("input", "features.0.0", "features.0.1", 2, 1, True, "stem")
    channels, index = 32, 1
    for t, c, n, s in STAGES:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = channels * t
            p = f"features.{index}.conv"
            block_in, name = x, f"block{index}"
            layer = 0
            if t != 1:
                x = g.conv_bn(x, f"{p}.0.0", f"{p}.0.1", 1, 1, True, f"{name}.expand")
                layer = 1
            x = g.conv_bn(
                x, f"{p}.{layer}.0", f"{p}.{layer}.1", stride, hidden, True, f"{name}.dw"
            )
            x = g.conv_bn(
                x, f"{p}.{layer + 1}", f"{p}.{layer + 2}", 1, 1, False, f"{name}.project"
            )
            if stride == 1 and channels == c:
                g.nodes.append(
                    helper.make_node("Add", [x, block_in], [f"{name}.out"], name=f"{name}.add")
                )
                x = f"{name}.out"
            channels, index = c, index + 1
    x = g.conv_bn(x, "features.18.0", "features.18.1", 1, 1, True, "head")
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
    g.nodes.append(helper.make_node("Flatten", ["pooled"], ["embedding"], name="flatten", axis=1))
    w = g.const("classifier.w", g.take("classifier.1.weight"))
    b = g.const("classifier.b", g.take("classifier.1.bias"))
    g.nodes.append(
        helper.make_node("Gemm", ["embedding", w, b], ["logits"], name="classifier", transB=1)
    )
    unused = sorted(set(state) - g.used)
    if unused:
        raise SystemExit(f"tensors of the .pth left unused: {unused}")
    graph = helper.make_graph(
        g.nodes,
        "mobilenet_v2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 1280]),
        ],
        g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="sieve ops/peer_ort.py",
        doc_string="torchvision MobileNetV2 ImageNet weights, BatchNorm folded (eps 1e-5)",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def reference_check(session):
    """The float64 reference logits worker/tests/it/mobilenet_import.rs pins sieve to."""
    side = 64
    n, c, h, w = np.meshgrid(
        np.arange(2), np.arange(3), np.arange(side), np.arange(side), indexing="ij"
    )
    x = (((h * 7 + w * 3 + c * 11 + n * 5) % 17) / 8.0 - 1.0).astype(np.float32)
    logits, embedding = session.run(["logits", "embedding"], {"input": x})
    reference = {
        0: [-0.467630, -0.506780],
        281: [0.833955, 0.777242],
        904: [2.938972, 2.850752],
        489: [2.820732, 3.158949],
        999: [1.367697, 1.445217],
    }
    worst = max(
        abs(logits[item, cls] - expected[item])
        for cls, expected in reference.items()
        for item in range(2)
    )
    sums = embedding.sum(axis=1)
    ok = (
        worst < 1e-3
        and list(logits.argmax(axis=1)) == [904, 489]
        and abs(sums[0] - 134.95225) < 1e-2
        and abs(sums[1] - 143.62177) < 1e-2
    )
    if not ok:
        raise SystemExit(
            f"the ONNX graph does not match the reference: worst logit error {worst:.2e}, "
            f"argmax {list(logits.argmax(axis=1))}, embedding sums {list(sums)}"
        )
    return worst


# ------------------------------------------------------------------ running it


def session(model_bytes, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def measure(seconds, batch, step):
    """sieve's `measure`: one warm-up call, then at least `seconds` and three calls."""
    step()
    started = time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - started < seconds:
        step()
        calls += 1
    return calls * batch / (time.perf_counter() - started)


def bench_inputs(args, side, batch):
    """The images of one row: the prefix of the file sieve's bench wrote (the same values),
    or uniform [-1, 1) values as sieve's `random_inputs` draws them."""
    if args.inputs_dir:
        path = os.path.join(args.inputs_dir, f"input-{side}.f32")
        flat = np.fromfile(path, dtype="<f4", count=batch * 3 * side * side)
        if flat.size != batch * 3 * side * side:
            raise SystemExit(f"{path} holds fewer than {batch} images of {side}x{side}")
        return flat.reshape(batch, 3, side, side)
    rng = np.random.default_rng(3)
    return rng.uniform(-1.0, 1.0, size=(batch, 3, side, side)).astype(np.float32)


def photo_inputs(args):
    """(names, [n, 3, 224, 224]): the tensors sieve preprocessed (`--photo-tensors`), or the
    photos preprocessed here as torchvision's eval transform does (Pillow)."""
    if args.photo_tensors:
        names = args.photo_names.split(",")
        flat = np.fromfile(args.photo_tensors, dtype="<f4")
        return names, flat.reshape(len(names), 3, 224, 224)
    from PIL import Image

    names, batch = [], []
    for name in PHOTOS:
        path = os.path.join(args.photos_dir, name)
        if not os.path.exists(path):
            continue
        image = Image.open(path).convert("RGB")
        w, h = image.size
        short = 256
        size = (short, short * h // w) if w <= h else (short * w // h, short)
        image = image.resize(size, Image.BILINEAR)
        left, top = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
        image = image.crop((left, top, left + 224, top + 224))
        x = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
        names.append(name)
        batch.append(x.transpose(2, 0, 1))
    if not names:
        return [], None
    return names, np.stack(batch).astype(np.float32)


def emit(record):
    print(json.dumps(record), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pth", default="ops/weights/mobilenet_v2-b0353104.pth")
    parser.add_argument("--onnx", default="ops/weights/mobilenet_v2.onnx")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--sides", default="96,224")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum per row")
    parser.add_argument("--inputs-dir", help="input-<side>.f32 files written by sieve's bench")
    parser.add_argument("--photo-tensors", help="[n, 3, 224, 224] f32 written by sieve's bench")
    parser.add_argument("--photo-names", default=",".join(PHOTOS))
    parser.add_argument("--photos-dir", default="ops/test-photos")
    parser.add_argument("--convert-only", action="store_true")
    parser.add_argument(
        "--serve", action="store_true", help="rows asked for on stdin ('SIDE BATCH' lines)"
    )
    args = parser.parse_args()

    if not os.path.exists(args.onnx) or os.path.getmtime(args.onnx) < os.path.getmtime(args.pth):
        started = time.perf_counter()
        model = build_onnx(load_state_dict(args.pth))
        tmp = args.onnx + ".tmp"
        onnx.save(model, tmp)
        os.replace(tmp, args.onnx)
        print(
            f"converted {args.pth} -> {args.onnx} in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    model = onnx.load(args.onnx)
    full = session(model.SerializeToString(), args.threads)
    worst = reference_check(full)
    print(f"{args.onnx}: reference logits within {worst:.1e}", file=sys.stderr)
    if args.convert_only:
        return

    # What sieve's forward bench times: the backbone to the pooled embedding.
    backbone = onnx.utils.Extractor(model).extract_model(["input"], ["embedding"])
    bench = session(backbone.SerializeToString(), args.threads)
    emit(
        {
            "ort": ort.__version__,
            "threads": args.threads,
            "provider": bench.get_providers()[0],
            "reference_max_error": float(worst),
        }
    )

    def row(side, batch):
        x = bench_inputs(args, side, batch)
        rate = measure(args.seconds, batch, lambda: bench.run(["embedding"], {"input": x}))
        emit({"input": side, "batch": batch, "img_per_s": rate})

    if args.serve:
        # One "SIDE BATCH" line per row, interleaved with the caller's own rows so that both
        # see the same machine load; the photos once stdin is closed.
        for line in iter(sys.stdin.readline, ""):
            side, batch = (int(v) for v in line.split())
            row(side, batch)
    else:
        for side in [int(s) for s in args.sides.split(",")]:
            for batch in [int(b) for b in args.batches.split(",")]:
                row(side, batch)

    names, photos = photo_inputs(args)
    if names:
        (logits,) = full.run(["logits"], {"input": photos})
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        for name, row in zip(names, probs):
            top = int(row.argmax())
            emit({"photo": name, "top1": top, "p": float(row[top])})
    else:
        print(f"no photos in {args.photos_dir} (ops/fetch-test-photos.sh)", file=sys.stderr)


if __name__ == "__main__":
    main()
