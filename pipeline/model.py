"""The studies' classifier: raw RGB -> ResNet50 preprocessing -> ResNet50 -> dense head -> softmax.

The model has three named parts so later steps can reach them (four with augmentation, whose
"augment" layers come first and act in training only): "preprocess" (a fixed 1x1
convolution doing ResNet50's caffe preprocessing, RGB->BGR minus the ImageNet mean, so the
logged model takes raw images and needs no custom code to load), "resnet50" (the backbone) and
"head" (Flatten or global average pooling -> Dense(units, relu) x hidden_layers -> Dropout ->
Dense(classes, softmax)).
"""

import functools
import hashlib
from contextlib import contextmanager
from pathlib import Path

import keras
import mlflow
import numpy as np

from pipeline.augment import augmentation
from pipeline.config import ModelParams, PipelineError, URI_SCHEME

IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


def build_model(cfg: ModelParams, n_classes: int, head: keras.Model | None = None,
                precision: str | None = None) -> keras.Model:
    """A model for cfg with n_classes outputs, trainable layers set by cfg.fine_tune (for two-phase
    training, cfg.finetune_epochs > 0, the backbone starts frozen: phase 2 calls set_fine_tune);
    not compiled: compile what is trained (the whole model, or only its head on cached features).

    head: a head already trained on cached features (build_head), to assemble the whole
    image-to-class model around; default: a new head, initialised from cfg.seed exactly as
    build_head would. With cfg.augment the model starts with the "augment" layers
    (pipeline.augment), which act in fit only. The backbone computes in precision (default
    cfg.precision, resolved); augmentation, preprocessing and the head stay float32.
    """
    inputs = keras.Input((cfg.image_size, cfg.image_size, 3), name="image")
    with dtype_policy(precision or resolve_precision(cfg.precision)):
        backbone = load_backbone(cfg.weights, cfg.image_size, cfg.seed)
    set_fine_tune(backbone, "none" if cfg.finetune_epochs else cfg.fine_tune, pretrained=cfg.weights != "none")
    augment = augmentation(cfg.augment, cfg.seed)
    x = preprocess_layer()(augment(inputs) if augment else inputs)
    # No training=False here: Keras 3 passes fit's training=True down into the nested backbone
    # anyway. BatchNorm's mode follows its trainable flag, which set_fine_tune sets.
    head = head or build_head(backbone.output.shape[1:], cfg, n_classes)
    return keras.Model(inputs, head(backbone(x)), name="resnet50_classifier")


def for_inference(model: keras.Model) -> keras.Model:
    """model without its "augment" layers (identity outside fit), sharing its other layers and
    weights: what an engine runs. OpenVINO cannot convert the random layers' ops."""
    names = [layer.name for layer in model.layers]
    if "augment" not in names:
        return model
    x = inputs = keras.Input(model.inputs[0].shape[1:], name="image")
    for layer in model.layers[names.index("augment") + 1:]:
        x = layer(x)
    return keras.Model(inputs, x, name=model.name)


def builder_of(model: keras.Model, config: dict, n_classes: int):
    """build(dtype_policy) for pipeline.engine: model's architecture (from its TrainConfig values)
    rebuilt in a dtype policy, with model's own weights."""
    fields = {k: v for k, v in config.items() if k in ModelParams.__dataclass_fields__}
    cfg = ModelParams(**{**fields, "weights": "none"})  # the weights come from model

    @functools.lru_cache(maxsize=2)
    def build(policy: str) -> keras.Model:
        twin = build_model(cfg, n_classes, precision=policy)
        twin.set_weights(model.get_weights())
        return twin
    return build


def backbone_policy(model: keras.Model) -> str | None:
    """The dtype policy a model of build_model's computes its backbone in (the policy of the
    backbone's layers: a loaded model's backbone itself reports float32), None without one."""
    try:
        backbone = model.get_layer("resnet50")
    except ValueError:
        return None
    return next((layer.dtype_policy.name for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)), None)


def feature_model(weights: str, image_size: int, seed: int, policy: str) -> keras.Model:
    """image -> the frozen backbone's features (ResNet50 preprocessing, then ResNet50) in a dtype
    policy: what the feature cache stores. The same weights as build_model's backbone."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    with dtype_policy(policy):
        backbone = load_backbone(weights, image_size, seed)
    backbone.trainable = False
    return keras.Model(inputs, backbone(preprocess_layer()(inputs), training=False), name="features")


def weights_digest(model: keras.Model) -> str:
    """Digest of a model's weights (values and shapes)."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(str(w.shape).encode())
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:16]


def backbone_identity(weights: str, seed: int) -> str:
    """What the backbone's weights are, without building it: random (seed), imagenet, a weights
    file's content, or the logged model they come from. Part of the feature cache's key."""
    if weights == "none":
        return f"random (seed {seed})"
    if URI_SCHEME.match(weights):
        try:
            return f"model {mlflow.models.get_model_info(weights).model_uuid}"
        except Exception as e:
            raise PipelineError(f"cannot read model {weights!r} for its backbone ({type(e).__name__}): pass a "
                                "model URI logged by train, e.g. runs:/<id>/model") from None
    if weights == "imagenet":
        return f"imagenet (keras {keras.__version__})"
    with open(weights, "rb") as f:
        return f"file sha256 {hashlib.file_digest(f, 'sha256').hexdigest()[:16]}"


def compile_for_training(model: keras.Model, learning_rate: float, steps_per_execution: int = 1, *,
                         label_smoothing: float = 0.0, weight_decay: float = 0.0, schedule: str = "constant",
                         epochs: int = 1, steps_per_epoch: int = 1) -> None:
    """Adam (decoupled weight decay with weight_decay > 0, as AdamW) and sparse cross-entropy (with
    label_smoothing, the one-hot targets' 1 - label_smoothing spread evenly over the classes).
    schedule: constant, or cosine (one epoch of linear warm-up to learning_rate, then a cosine
    decay to 0 at the end of epoch `epochs`, counted in steps of steps_per_epoch). A head on
    cached features runs many small steps: several per call (steps_per_execution, the same
    updates in the same order) halve its epoch time. No XLA: Keras turns it off (and warns)
    under the op determinism that train turns on."""
    rate = learning_rate
    if schedule == "cosine":
        warmup = steps_per_epoch if epochs > 1 else 0
        rate = keras.optimizers.schedules.CosineDecay(0.0, max(1, steps_per_epoch * epochs - warmup),
                                                      warmup_target=learning_rate, warmup_steps=warmup)
    loss = SmoothedSparseCrossentropy(label_smoothing) if label_smoothing else "sparse_categorical_crossentropy"
    model.compile(optimizer=FusedAdam(rate, weight_decay=weight_decay or None), loss=loss,
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  steps_per_execution=steps_per_execution)


class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Keras' categorical cross-entropy with label_smoothing, on class indices (Keras' sparse
    cross-entropy has no label smoothing)."""

    def __init__(self, label_smoothing: float, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        classes = keras.ops.shape(y_pred)[-1]
        one_hot = keras.ops.one_hot(keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,)), classes)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


class FusedAdam(keras.optimizers.Adam):
    """Keras' Adam with each weight's update done by TensorFlow's fused Adam kernel: the same
    formula in one pass over the weight and its two moments, where Keras' ops make about twelve.
    A flatten head's kernel (100,352 x units at 224 px) is updated every step of 32 cached
    features, so those passes were most of a head's step. Under a distribution strategy (whose
    variables are per replica) Keras' own update runs."""

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        if tf.distribute.has_strategy():
            return super().update_step(gradient, variable, learning_rate)
        i = self._get_variable_index(variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[i].handle, v=self._velocities[i].handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
            beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))

    def _apply_weight_decay(self, variables):
        """Keras' decoupled weight decay, with the step's learning rate computed once: Keras reads
        it per weight, and a schedule's rate is a tf.cond each time (214 in the recipe's ResNet50: 14 of the
        53 s that tracing the recipe's first step took, and as many conds in every step)."""
        import tensorflow as tf

        if self.weight_decay is None or tf.distribute.has_strategy():
            return super()._apply_weight_decay(variables)
        rate = self.learning_rate
        for variable in variables:
            if self._use_weight_decay(variable):
                variable.assign_sub(variable * tf.cast(self.weight_decay, variable.dtype) * tf.cast(rate, variable.dtype))


def resolve_precision(precision: str) -> str:
    """auto: mixed_float16 on a GPU, mixed_bfloat16 on a CPU with bfloat16 instructions, else float32."""
    if precision != "auto":
        return precision
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "mixed_bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


@contextmanager
def dtype_policy(name: str):
    """Layers created inside compute in this Keras dtype policy; the global policy is restored after."""
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def preprocess_layer() -> keras.layers.Layer:
    """ResNet50's preprocess_input as a frozen 1x1 convolution: BGR = permute(RGB) - mean."""
    layer = keras.layers.Conv2D(3, 1, name="preprocess", trainable=False, dtype="float32")
    layer.build((None, None, None, 3))
    kernel = np.zeros((1, 1, 3, 3), "float32")
    for rgb in range(3):
        kernel[0, 0, rgb, 2 - rgb] = 1.0
    layer.set_weights([kernel, -np.array(IMAGENET_BGR_MEAN, "float32")])
    return layer


def build_head(feature_shape, cfg: ModelParams, n_classes: int) -> keras.Model:
    """The trainable classifier on top of the backbone's feature map, initialised from cfg.seed
    (whether or not a backbone was built before it in this process)."""
    keras.utils.set_random_seed(cfg.seed)
    pool = keras.layers.Flatten() if cfg.pooling == "flatten" else keras.layers.GlobalAveragePooling2D()
    layers = [keras.Input(tuple(feature_shape)), pool]
    layers += [keras.layers.Dense(cfg.units, activation="relu") for _ in range(cfg.hidden_layers)]
    layers += [keras.layers.Dropout(cfg.dropout), keras.layers.Dense(n_classes, activation="softmax", dtype="float32")]
    return keras.Sequential(layers, name="head")


def load_backbone(weights: str, image_size: int, seed: int) -> keras.Model:
    """ResNet50 without its top, with weights: imagenet, none (random, from seed: the same seed
    always gives the same weights), a weights file, or a model URI."""
    shape = (image_size, image_size, 3)
    keras.utils.set_random_seed(seed)
    if URI_SCHEME.match(weights):
        backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=shape)
        backbone.set_weights(_backbone_weights_from(weights))
        return backbone
    try:
        return keras.applications.ResNet50(include_top=False, weights=None if weights == "none" else weights,
                                           input_shape=shape)
    except Exception as e:
        if weights == "imagenet":
            raise PipelineError(f"cannot download the ImageNet weights ({type(e).__name__}); offline, use "
                                "weights=none, a weights .h5 file, or a model URI from an earlier run") from None
        raise PipelineError(f"cannot load weights file {weights!r} into ResNet50 ({e})".splitlines()[0]) from None


def _backbone_weights_from(uri: str) -> list:
    from pipeline.card import load_model

    try:
        return load_model(uri)[0].get_layer("resnet50").get_weights()
    except Exception as e:
        raise PipelineError(f"cannot take backbone weights from model {uri!r} ({type(e).__name__}): "
                            "pass a model URI logged by train, e.g. runs:/<id>/model") from None


def set_fine_tune(backbone: keras.Model, fine_tune: str, pretrained: bool) -> None:
    """none: frozen; all: every layer trainable; N: only the top N layers trainable.

    A pretrained backbone's BatchNormalization layers stay frozen whatever fine_tune says, as the
    Keras transfer-learning guide advises: a frozen BatchNormalization layer runs in inference
    mode (Keras 3), so small fine-tuning batches neither replace its learnt statistics in the
    forward pass nor overwrite them. Calling the backbone with training=False does not achieve
    this inside a functional model (Keras 3.15 hands fit's training=True down to nested layers).
    A backbone trained from scratch (pretrained=False) needs its BatchNorm layers to learn.
    """
    backbone.trainable = fine_tune != "none"
    if fine_tune.isdigit():
        for layer in backbone.layers[: -int(fine_tune)]:
            layer.trainable = False
    if pretrained:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def synchronize_batchnorm(model: keras.Model) -> None:
    """Over several replicas (tf.distribute.MirroredStrategy), the backbone's BatchNorm layers
    normalise a training batch by the statistics of the whole batch, all replicas' parts, as on
    one device. Otherwise each replica keeps moving statistics of its own part, validation scores
    each part with its replica's, and the model logged keeps the first replica's only."""
    for layer in model.get_layer("resnet50").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
