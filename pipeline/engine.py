"""One door to run a Keras image model fast for inference: OpenVINO or TensorFlow.

Which engine runs the frozen backbone (feature extraction), evaluate's and predict's full models
and the served model is decided here, in resolve_engine, and nowhere else:

- openvino: the model is converted (`openvino.convert_model`, 2-6 s for ResNet50) at a fixed
  batch of 8 once per architecture and weights: the converted model is kept on disk (ir_cache),
  so another process running the same model (the next predict, a restarted server, a new split's
  extraction) reads it in a few milliseconds. It is compiled for the CPU with the THROUGHPUT
  hint and fed round its infer requests asynchronously. In bfloat16 on a CPU with bfloat16
  instructions it runs ResNet50 two (AMD EPYC, AVX512_BF16) to six (Intel with AMX) times faster
  than TensorFlow; see the README's Performance section for figures. OpenVINO's usage telemetry
  is kept off.
- tensorflow: a compiled `tf.function` of the model (not `predict`, which can fall into a slow
  mode), in the model's own dtype policy. The engine for GPUs and where OpenVINO is missing.

An engine's output is checked against the TensorFlow float32 model on a few images
(check_against_reference); past MAX_REL_ERROR it raises EngineMismatch (pipeline.features then
extracts in float32 instead; in float32 the step stops with one line).
"""

import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import keras
import numpy as np

from pipeline.config import PipelineError, cache_folder
from pipeline.model import weights_digest

OPENVINO_BATCH = 8  # fixed batch of the compiled model: measured best on 2-core CPUs
# Relative error (Frobenius norm of the difference over the reference's) of an engine's output
# against TensorFlow float32 on the same images. Measured: OpenVINO bfloat16 0.7%, TensorFlow's
# own mixed bfloat16 0.8%, OpenVINO float32 1.5e-6.
MAX_REL_ERROR = {"mixed_bfloat16": 0.05, "mixed_float16": 0.02, "float32": 1e-3}


def has_openvino() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_engine(engine: str) -> str:
    """auto: tensorflow on a GPU, openvino on a CPU where it is installed, else tensorflow."""
    if engine != "auto":
        if engine == "openvino" and not has_openvino():
            raise PipelineError("engine=openvino, but OpenVINO is not installed: pip install openvino, "
                                "or use engine=tensorflow")
        return engine
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU") or not has_openvino():
        return "tensorflow"
    return "openvino"


class Runner:
    """A compiled model. run(batches, out) writes its outputs for an iterable of image batches
    (float32 NHWC arrays or tensors) into out row by row and returns out; runner(images) runs one
    array."""
    engine: str
    precision: str
    output_shape: tuple

    def run(self, batches: Iterable, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.run([images], np.empty((len(images), *self.output_shape), np.float32))


def compile_model(build: Callable[[str], keras.Model], engine: str, precision: str, cache: Path | None = None,
                  source: keras.Model | None = None) -> Runner:
    """A Runner of the model that build(dtype_policy) makes, with engine (resolved: openvino or
    tensorflow) computing in precision. OpenVINO converts the float32 build (it does not convert
    a mixed-precision Keras model) and computes in precision itself; TensorFlow runs the build in
    precision's policy. cache: the folder of converted models (ir_cache; None: convert every
    time); source: the model whose architecture and weights key it (default build("float32"))."""
    if engine == "openvino":
        return _OpenVINO(build, precision, cache, source)
    return _TensorFlow(build(precision), precision)


def compile_classifier(model: keras.Model, config: dict, n_classes: int, engine: str, precision: str,
                       cache_dir: str | None = "") -> Runner:
    """A Runner of a whole image-to-class model of pipeline.model, run as it is where its backbone
    computes in the policy the engine needs, else rebuilt in that policy from its TrainConfig values
    (config) with its own weights; engine as the user gave it (auto resolved).
    Its augmentation layers, identity outside fit, are left out (model.for_inference).
    A model converted before (same architecture and weights) is read from cache_dir's ir_cache
    without rebuilding it; cache_dir None: convert, keep nothing (a model no one runs again)."""
    from pipeline.model import backbone_policy, builder_of, for_inference

    rebuild = builder_of(model, config, n_classes)

    def build(policy: str) -> keras.Model:  # model itself where it computes in policy already
        return for_inference(model if policy == backbone_policy(model) else rebuild(policy))
    return compile_model(build, resolve_engine(engine), precision, None if cache_dir is None else ir_cache(cache_dir),
                         source=model)


def ir_cache(cache_dir: str = "") -> Path:
    """Where converted models are kept: the openvino folder of the cache (pipeline.config.cache_folder)."""
    return cache_folder(cache_dir) / "openvino"


def _ir_key(model: keras.Model) -> str:
    """Same architecture, weights, input shape and converter versions: same converted model."""
    import openvino as ov
    import tensorflow as tf

    versions = f"openvino {ov.__version__}|tensorflow {tf.__version__}|keras {keras.__version__}"
    h = hashlib.sha256(_architecture(model).encode())
    h.update(f"{weights_digest(model)}|{OPENVINO_BATCH}|{versions}".encode())
    return h.hexdigest()[:24]


def _architecture(model: keras.Model) -> str:
    """model's Keras config as JSON with every name replaced by its order of appearance: Keras
    numbers the layers it names per process (rescaling_3), which changes names, not the model."""
    config, names = json.loads(model.to_json()), {}

    def collect(node):
        if isinstance(node, dict):
            if isinstance(node.get("name"), str):
                names.setdefault(node["name"], f"#{len(names)}")
            node = list(node.values())
        if isinstance(node, list):
            for child in node:
                collect(child)

    def renamed(node):
        if isinstance(node, dict):
            return {k: renamed(child) for k, child in node.items()}
        if isinstance(node, list):
            return [renamed(child) for child in node]
        return names.get(node, node) if isinstance(node, str) else node

    collect(config)
    return json.dumps(renamed(config), sort_keys=True)


def _read_ir(folder: Path):
    """The converted model kept in folder, or None if there is none or it is not whole (meta.json,
    written last, holds the size and Adler-32 checksum of its weights file)."""
    import openvino as ov

    try:
        meta = json.loads((folder / "meta.json").read_text())
        weights = (folder / "model.bin").read_bytes()
        if len(weights) != meta["bytes"] or zlib.adler32(weights) != meta["adler32"]:
            print(f"converted model {folder} is damaged: converting again")
            return None
        return ov.Core().read_model(folder / "model.xml")
    except (OSError, ValueError, KeyError, RuntimeError):
        return None


def _keep_ir(converted, folder: Path) -> None:
    """Save converted into folder (float32 weights, as converted), whole or not at all: written
    into a folder of this process's own, then renamed into place. Another process that kept the
    same model first wins; a folder that cannot be written is a note, not an error."""
    import openvino as ov

    own = folder.with_name(f"{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        ov.save_model(converted, own / "model.xml", compress_to_fp16=False)
        weights = (own / "model.bin").read_bytes()
        (own / "meta.json").write_text(json.dumps({"bytes": len(weights), "adler32": zlib.adler32(weights)}))
        shutil.rmtree(folder, ignore_errors=True)  # a damaged one, or another process's identical one
        os.rename(own, folder)
    except (OSError, RuntimeError) as e:  # RuntimeError: OpenVINO's, for a folder it cannot write
        if not (folder / "meta.json").is_file():
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
            print(f"note: could not keep the converted model in {folder.parent} ({reason}): "
                  "it is converted again next time")
    finally:
        shutil.rmtree(own, ignore_errors=True)


class _OpenVINO(Runner):
    engine = "openvino"

    def __init__(self, build: Callable[[str], keras.Model], precision: str, cache: Path | None,
                 source: keras.Model | None):
        import openvino as ov

        self.precision = precision
        folder = cache / _ir_key(source or build("float32")) if cache else None
        converted = _read_ir(folder) if folder else None
        if converted is None:
            converted = _convert(build("float32"))
            if folder:
                _keep_ir(converted, folder)
        hint = {"mixed_bfloat16": "bf16", "mixed_float16": "f16"}.get(precision, "f32")
        self.compiled = ov.Core().compile_model(converted, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT",
                                                                   "INFERENCE_PRECISION_HINT": hint})
        self.output_shape = tuple(self.compiled.output(0).get_shape())[1:]
        # two requests per stream: when a stream finishes one, the next is already queued for it
        self.requests = 2 * max(1, self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def run(self, batches, out: np.ndarray) -> np.ndarray:
        """Chunks of OPENVINO_BATCH images go round the compiled model's infer requests, so the
        next chunk is decoded while earlier ones run. No completion callbacks: they run on
        OpenVINO's threads and need the GIL, which hung inside a process that also trained."""
        requests = [self.compiled.create_infer_request() for _ in range(self.requests)]
        pending: list[tuple[int, int] | None] = [None] * len(requests)

        def collect(k: int) -> None:
            if pending[k] is not None:
                requests[k].wait()
                start, n = pending[k]
                out[start:start + n] = requests[k].get_output_tensor(0).data[:n]
                pending[k] = None

        start, k = 0, 0
        for batch in batches:
            batch = np.asarray(batch, np.float32)
            for i in range(0, len(batch), OPENVINO_BATCH):
                chunk = batch[i:i + OPENVINO_BATCH]
                n = len(chunk)
                if n < OPENVINO_BATCH:  # the compiled batch is fixed: pad the last chunk
                    chunk = np.concatenate([chunk, np.zeros((OPENVINO_BATCH - n, *chunk.shape[1:]), np.float32)])
                collect(k)
                requests[k].start_async({0: chunk})
                pending[k] = (start, n)
                start, k = start + n, (k + 1) % len(requests)
        for k in range(len(requests)):
            collect(k)
        if start != len(out):
            raise ValueError(f"{start} images for {len(out)} output rows")
        return out


class _TensorFlow(Runner):
    engine = "tensorflow"

    def __init__(self, model: keras.Model, precision: str):
        import tensorflow as tf

        self.precision = precision

        signature = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)]
        self.forward = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32),
                                   input_signature=signature)
        self.output_shape = tuple(model.outputs[0].shape[1:])

    def run(self, batches, out: np.ndarray) -> np.ndarray:
        start = 0
        for batch in batches:
            block = self.forward(batch).numpy()
            out[start:start + len(block)] = block
            start += len(block)
        if start != len(out):
            raise ValueError(f"{start} images for {len(out)} output rows")
        return out


def _convert(model: keras.Model):
    """model (float32) as an OpenVINO model with a fixed batch of OPENVINO_BATCH."""
    import openvino as ov

    _telemetry_off()
    with warnings.catch_warnings():  # Keras warns that the converter's tracing passes a list, not a dict
        warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
        return ov.convert_model(model, input=[(OPENVINO_BATCH, *model.inputs[0].shape[1:])])


@functools.cache
def _telemetry_off() -> None:
    """OpenVINO's converter sends usage telemetry unless the user opted out; use its own stub (what
    it uses when openvino-telemetry is not installed) so this package never sends any."""
    import openvino.tools.ovc.convert_impl as convert_impl
    import openvino.tools.ovc.telemetry_stub as stub
    import openvino.tools.ovc.telemetry_utils as telemetry_utils

    telemetry_utils.tm = stub
    convert_impl.tm = stub


def relative_error(output: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(output.astype(np.float64) - reference) / max(np.linalg.norm(reference), 1e-12))


class EngineMismatch(PipelineError):
    """An engine's output differs from TensorFlow float32's past MAX_REL_ERROR (error: the relative
    error; bound: the precision's)."""

    def __init__(self, message: str, error: float, bound: float):
        super().__init__(message)
        self.error, self.bound = error, bound


def check_against_reference(runner: Runner, build: Callable[[str], keras.Model], images: np.ndarray) -> float:
    """Relative error of runner against build("float32") run by TensorFlow on images (a few are
    enough); an EngineMismatch past MAX_REL_ERROR for the runner's precision."""
    reference = np.asarray(build("float32")(images, training=False), np.float64)
    error = relative_error(runner(images), reference)
    bound = MAX_REL_ERROR.get(runner.precision, MAX_REL_ERROR["float32"])
    if not math.isfinite(error) or error > bound:
        raise EngineMismatch(f"engine {runner.engine} ({runner.precision}) differs from TensorFlow float32 by "
                             f"{error:.2%} on {len(images)} images (bound {bound:.2%}): use engine=tensorflow "
                             "or precision=float32, and report the versions of openvino and tensorflow", error, bound)
    return error
