"""Faster R-CNN (Ren et al., 2015) and Mask R-CNN (He et al., 2017) in torchvision's v1 layout.

A frozen-BN ResNet-50 with an FPN on C2-C5 and a stride-2 subsample of P5 as P6
(`backbone`: torchvision's `returned_layers=[1, 2, 3, 4]`, `LastLevelMaxPool`); the RPN head
(`rpn`: a 3x3 conv + ReLU shared by all five levels, then 1x1 convs to A objectness logits and
A * 4 deltas); the box head on 7x7 MultiScaleRoIAlign crops of P2-P5 (`box_mlp`: torchvision's
TwoMLPHead fc6 / fc7; `box_predictor`: cls_score and class-specific bbox_pred); and for Mask
R-CNN the mask head on 14x14 crops (`mask_convs`: four 3x3 conv + ReLU; `mask_predictor`: a
2x2 stride-2 transposed conv + ReLU, then a 1x1 conv to one 28x28 mask logit map per class).

Each stage is a method, usable through `model.apply(variables, ..., method=...)`, so training
code can run them one by one (with its own proposal sampling); `__call__` is torchvision's
whole inference path with static shapes: features -> rpn_head -> `propose` (test sizes) ->
box_head -> `two_stage_detections` -> (mask_head on the detections). It returns

    {'boxes': [B, D, 4], 'scores': [B, D], 'classes': [B, D] int32 (0..K-1), 'valid': [B, D]}

plus 'mask_probs' [B, D, 28, 28] (the sigmoid of each detection's class channel, not yet pasted
into the image) for Mask R-CNN. `num_classes` counts the background, as torchvision does (COCO:
91; K data classes -> K + 1; class column 0 is the background). Images come in normalised and
resized (the detection task's transform, torchvision's GeneralizedRCNNTransform); boxes are xyxy
input pixels.

torchvision freezes conv1 and layer1 of a pretrained backbone (trainable_backbone_layers=3);
here, as for the one-stage detectors, every parameter is trainable and a run freezes layers with
`config.freeze` (`frozen_backbone_pattern(3)` gives torchvision's choice). The published COCO v1
weights were trained with BatchNorm epsilon 0: pass `bn_epsilon=0.0` with them, as torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.detection.anchors import AnchorSet, feature_shapes, grid_anchors
from jaxvision.detection.roi_align import multiscale_roi_align
from jaxvision.detection.rpn import propose, two_stage_detections
from jaxvision.layers.conv import BN_EPSILON, conv_kernel_init
from jaxvision.models.detection_backbone import ResNetFPN, concat_levels, resnet_fpn_strides
from jaxvision.models.registry import register_model

# torchvision's initialisations: RPN convs N(0, 0.01) with zero bias; nn.Linear's default
# (uniform over +-1/sqrt(fan_in)); the mask head's convs kaiming_normal(fan_out).
rpn_kernel_init = nn.initializers.normal(0.01)
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
BOX_ROI_SIZE = 7
MASK_ROI_SIZE = 14
ROI_SAMPLING_RATIO = 2
ROI_LEVELS = 4  # the RoI heads crop P2-P5 (torchvision's featmap_names '0' ... '3')


def frozen_backbone_pattern(trainable_layers: int = 3) -> str:
  """A `config.freeze` regex fixing what torchvision's `trainable_backbone_layers` fixes: the
  ResNet stages (and the stem) below the `trainable_layers` last of conv1, layer1 ... layer4."""
  if not 0 <= trainable_layers <= 5:
    raise ValueError(f"trainable_layers={trainable_layers}; choose 0 ... 5")
  frozen = ["conv1"] + [f"layer{i}_\\d+" for i in range(1, 5)]
  frozen = frozen[:5 - trainable_layers]
  return "^backbone/body/(" + "|".join(frozen) + ")/" if frozen else ""


class RPNHead(nn.Module):
  """A 3x3 conv + ReLU, then 1x1 convs to `num_anchors` logits and `num_anchors * 4` deltas,
  shared by all levels; outputs concatenated over levels in anchor order.

  Attributes:
    num_anchors: anchors per location A.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_anchors: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    kw = dict(kernel_init=rpn_kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
    conv = nn.Conv(levels[0].shape[-1], (3, 3), padding=((1, 1), (1, 1)), name="conv", **kw)
    cls_logits = nn.Conv(self.num_anchors, (1, 1), name="cls_logits", **kw)
    bbox_pred = nn.Conv(self.num_anchors * 4, (1, 1), name="bbox_pred", **kw)
    logits, deltas = [], []
    for x in levels:
      x = nn.relu(conv(x))
      logits.append(cls_logits(x))
      deltas.append(bbox_pred(x))
    return concat_levels(logits, 1)[..., 0], concat_levels(deltas, 4)


class BoxHead(nn.Module):
  """torchvision's TwoMLPHead (fc6, fc7 with ReLU) and FastRCNNPredictor (cls_score,
  bbox_pred) on flattened RoI crops [..., 7 * 7 * C] (HWC order).

  Attributes:
    num_classes: classes including the background.
    representation_size: width of fc6 and fc7.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_classes: int
  representation_size: int = 1024
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    dense = lambda n, name: nn.Dense(n, kernel_init=linear_kernel_init, name=name,
                                     dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(dense(self.representation_size, "fc6")(x))
    x = nn.relu(dense(self.representation_size, "fc7")(x))
    return dense(self.num_classes, "cls_score")(x), dense(self.num_classes * 4, "bbox_pred")(x)


class UpConv2x2(nn.Module):
  """ConvTranspose2d(kernel 2, stride 2, padding 0): every input pixel becomes a 2x2 block,
  out[2i + a, 2j + b] = x[i, j] @ kernel[a, b] + bias (kernel [2, 2, in, out]).

  Attributes:
    features: output channels.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", conv_kernel_init, (2, 2, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    n, h, w, _ = x.shape
    y = jnp.einsum("nhwc,abco->nhawbo", x.astype(self.dtype), kernel.astype(self.dtype))
    return y.reshape(n, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class MaskHead(nn.Module):
  """torchvision's MaskRCNNHeads (3x3 conv + ReLU per layer, `mask_fcn1` ...) and
  MaskRCNNPredictor (`conv5_mask` 2x2 up-convolution + ReLU, `mask_fcn_logits` 1x1 conv) on
  RoI crops [N, 14, 14, C] -> mask logits [N, 28, 28, num_classes].

  Attributes:
    num_classes: classes including the background.
    layers: widths of the 3x3 convolutions.
    dim_reduced: width of the up-convolution.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  num_classes: int
  layers: Sequence[int] = (256, 256, 256, 256)
  dim_reduced: int = 256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(kernel_init=conv_kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
    for i, width in enumerate(self.layers):
      x = nn.relu(nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), name=f"mask_fcn{i + 1}",
                          **kw)(x))
    x = nn.relu(UpConv2x2(self.dim_reduced, name="conv5_mask", dtype=self.dtype,
                          param_dtype=self.param_dtype)(x))
    return nn.Conv(self.num_classes, (1, 1), name="mask_fcn_logits", **kw)(x)


def _static_hw(image_hw) -> tuple[int, int]:
  """(H, W) as Python ints: the RoI heads infer their pyramid scales from it, as torchvision
  does from the largest image of the batch."""
  if any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(image_hw)):
    raise ValueError("image_hw must be static (the input's (H, W)): the RoI heads infer the "
                     "pyramid scales from it")
  hw = np.asarray(image_hw)
  if hw.ndim == 2:
    hw = hw.max(axis=0)
  if hw.shape != (2,):
    raise ValueError(f"image_hw must be (H, W) or [B, 2], got shape {hw.shape}")
  return int(hw[0]), int(hw[1])


class FasterRCNN(nn.Module):
  """Faster R-CNN on a frozen-BN ResNet-FPN (see the module docstring).

  Attributes:
    num_classes: classes including the background (torchvision's COCO models: 91).
    layers: ResNet blocks per stage.
    block: 'basic' or 'bottleneck'.
    widths: ResNet stage widths.
    fpn_features: channels of the pyramid levels, the RPN and the RoI crops.
    anchor_sizes: the anchor size of each level P2 ... P6, in pixels.
    aspect_ratios: anchor height / width ratios (every level).
    representation_size: width of the box head's fc6 / fc7.
    rpn_pre_nms_top_n_train: proposals per level before NMS in training.
    rpn_pre_nms_top_n_test: the same at inference.
    rpn_post_nms_top_n_train: proposals per image after NMS in training.
    rpn_post_nms_top_n_test: the same at inference.
    rpn_nms_thresh: IoU above which the RPN's NMS suppresses.
    rpn_score_thresh: lowest objectness probability a proposal keeps.
    rpn_fg_iou_thresh: anchor-gt IoU from which an anchor is foreground in training.
    rpn_bg_iou_thresh: IoU below which it is background.
    rpn_batch_size_per_image: anchors sampled per image for the RPN loss.
    rpn_positive_fraction: largest foreground share of that sample.
    box_score_thresh: lowest class probability a detection keeps.
    box_nms_thresh: IoU above which the per-class NMS suppresses.
    box_detections_per_img: detections D per image.
    box_fg_iou_thresh: proposal-gt IoU from which a proposal is foreground in training.
    box_bg_iou_thresh: IoU below which it is background.
    box_batch_size_per_image: proposals sampled per image for the box loss.
    box_positive_fraction: largest foreground share of that sample.
    bn_epsilon: epsilon of the frozen BatchNorms (0 for torchvision's COCO v1 weights).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  # The detection task picks its loss and decoding by this name.
  family: ClassVar[str] = "rcnn"
  has_masks: ClassVar[bool] = False

  num_classes: int = 91
  layers: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  widths: Sequence[int] = (64, 128, 256, 512)
  fpn_features: int = 256
  anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512)
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  representation_size: int = 1024
  rpn_pre_nms_top_n_train: int = 2000
  rpn_pre_nms_top_n_test: int = 1000
  rpn_post_nms_top_n_train: int = 2000
  rpn_post_nms_top_n_test: int = 1000
  rpn_nms_thresh: float = 0.7
  rpn_score_thresh: float = 0.0
  rpn_fg_iou_thresh: float = 0.7
  rpn_bg_iou_thresh: float = 0.3
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  box_score_thresh: float = 0.05
  box_nms_thresh: float = 0.5
  box_detections_per_img: int = 100
  box_fg_iou_thresh: float = 0.5
  box_bg_iou_thresh: float = 0.5
  box_batch_size_per_image: int = 512
  box_positive_fraction: float = 0.25
  bn_epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_anchors(self) -> int:
    """Anchors per location A (one size per level times the aspect ratios)."""
    return len(self.aspect_ratios)

  def setup(self):
    if self.num_classes < 2:
      raise ValueError(f"{type(self).__name__} num_classes={self.num_classes} counts the "
                       "background: K data classes need K + 1")
    if len(self.anchor_sizes) != 5:
      raise ValueError(f"{type(self).__name__} anchor_sizes={tuple(self.anchor_sizes)}: one "
                       "size per level P2 ... P6")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.backbone = ResNetFPN(self.layers, self.block, self.widths, self.fpn_features, "pool",
                              self.bn_epsilon, min_level=2, **kw)
    self.rpn = RPNHead(self.num_anchors, **kw)
    self.box_heads = BoxHead(self.num_classes, self.representation_size, **kw)

  def features(self, images: jax.Array, train: bool = False) -> list[jax.Array]:
    """The pyramid [P2, P3, P4, P5, P6] (NHWC, strides 4 ... 64) of images [B, H, W, C]."""
    return self.backbone(images, train=train)

  def rpn_head(self, feature_maps: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(objectness [B, A], deltas [B, A, 4]) over all levels, in `rpn_anchors` order."""
    return self.rpn(feature_maps)

  def rpn_anchors(self, image_hw: Sequence[int]) -> AnchorSet:
    """The RPN's anchors for an input of `image_hw`: one size per level P2 ... P6 times the
    aspect ratios, as torchvision's AnchorGenerator (static NumPy)."""
    image_hw = _static_hw(image_hw)
    shapes = feature_shapes(image_hw, resnet_fpn_strides("pool", min_level=2))
    sizes = [(s,) for s in self.anchor_sizes]
    return grid_anchors(image_hw, shapes, sizes, (tuple(self.aspect_ratios),) * len(sizes))

  def box_head(self, feature_maps: Sequence[jax.Array], rois: jax.Array,
               image_hw: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """(class_logits [B, R, num_classes], box_regression [B, R, num_classes * 4]) of rois
    [B, R, 4] (xyxy input pixels), on 7x7 MultiScaleRoIAlign crops of P2-P5."""
    crops = multiscale_roi_align(feature_maps[:ROI_LEVELS], rois, _static_hw(image_hw),
                                 BOX_ROI_SIZE, sampling_ratio=ROI_SAMPLING_RATIO)
    return self.box_heads(crops.reshape(*rois.shape[:2], -1))

  def mask_head(self, feature_maps: Sequence[jax.Array], rois: jax.Array,
                image_hw: Sequence[int]) -> jax.Array:
    """Mask logits [B, R, 28, 28, num_classes] of rois [B, R, 4] (Mask R-CNN only)."""
    raise ValueError(f"{type(self).__name__} has no mask head; use a Mask R-CNN variant")

  def detect(self, feature_maps: Sequence[jax.Array], image_hw: Sequence[int]) -> dict:
    """The inference path after the backbone: proposals (test sizes), box head, detections."""
    objectness, deltas = self.rpn_head(feature_maps)
    proposals, _, proposal_valid = propose(
        objectness, deltas, self.rpn_anchors(image_hw), image_hw,
        pre_nms_top_n=self.rpn_pre_nms_top_n_test, post_nms_top_n=self.rpn_post_nms_top_n_test,
        nms_thresh=self.rpn_nms_thresh, score_thresh=self.rpn_score_thresh)
    class_logits, box_regression = self.box_head(feature_maps, proposals, image_hw)
    return two_stage_detections(
        class_logits, box_regression, proposals, proposal_valid, image_hw,
        score_thresh=self.box_score_thresh, nms_thresh=self.box_nms_thresh,
        detections_per_img=self.box_detections_per_img)

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Detections of images [B, H, W, C] (see the module docstring); `train` reaches only the
    backbone (whose BatchNorms are frozen), proposals use the test sizes."""
    return self.detect(self.features(images, train=train), images.shape[1:3])


class MaskRCNN(FasterRCNN):
  """Mask R-CNN: Faster R-CNN plus the mask head on 14x14 crops of each detection.

  Attributes:
    mask_layers: widths of the mask head's 3x3 convolutions.
    mask_dim_reduced: width of its up-convolution.
  """

  has_masks: ClassVar[bool] = True

  mask_layers: Sequence[int] = (256, 256, 256, 256)
  mask_dim_reduced: int = 256

  def setup(self):
    super().setup()
    self.mask_heads = MaskHead(self.num_classes, tuple(self.mask_layers), self.mask_dim_reduced,
                               dtype=self.dtype, param_dtype=self.param_dtype)

  def mask_head(self, feature_maps: Sequence[jax.Array], rois: jax.Array,
                image_hw: Sequence[int]) -> jax.Array:
    """Mask logits [B, R, 28, 28, num_classes] of rois [B, R, 4] (xyxy input pixels), on 14x14
    MultiScaleRoIAlign crops of P2-P5."""
    crops = multiscale_roi_align(feature_maps[:ROI_LEVELS], rois, _static_hw(image_hw),
                                 MASK_ROI_SIZE, sampling_ratio=ROI_SAMPLING_RATIO)
    b, r = rois.shape[:2]
    logits = self.mask_heads(crops.reshape(b * r, *crops.shape[2:]))
    return logits.reshape(b, r, *logits.shape[1:])

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Detections with 'mask_probs' [B, D, 28, 28]: the sigmoid of each detection's class
    channel (torchvision's maskrcnn_inference), 0 in unused slots."""
    image_hw = images.shape[1:3]
    feature_maps = self.features(images, train=train)
    detections = self.detect(feature_maps, image_hw)
    logits = self.mask_head(feature_maps, detections["boxes"], image_hw)
    column = (detections["classes"] + 1)[:, :, None, None, None]
    probs = jax.nn.sigmoid(jnp.take_along_axis(logits, column, axis=-1)[..., 0]
                           .astype(jnp.float32))
    return {**detections,
            "mask_probs": jnp.where(detections["valid"][:, :, None, None], probs, 0.0)}


_FASTER = "Ren et al. 2015, Faster R-CNN: towards real-time object detection with RPNs"
_MASK = "He et al. 2017, Mask R-CNN"


def _tiny(kwargs: dict) -> dict:
  """The CPU-sized defaults shared by both tiny variants."""
  for key, value in (("layers", (1, 1, 1, 1)), ("block", "basic"), ("widths", (8, 16, 32, 64)),
                     ("fpn_features", 32), ("anchor_sizes", (8, 16, 32, 64, 128)),
                     ("representation_size", 64), ("rpn_pre_nms_top_n_train", 600),
                     ("rpn_pre_nms_top_n_test", 300), ("rpn_post_nms_top_n_train", 300),
                     ("rpn_post_nms_top_n_test", 100), ("box_batch_size_per_image", 128),
                     ("box_detections_per_img", 50)):
    kwargs.setdefault(key, value)
  return kwargs


@register_model(input_shape=(800, 800, 3), num_classes=91, paper=_FASTER)
def fasterrcnn_resnet50_fpn(**kwargs) -> FasterRCNN:
  """Faster R-CNN, ResNet-50-FPN (torchvision's v1 `fasterrcnn_resnet50_fpn`)."""
  return FasterRCNN(**kwargs)


@register_model(input_shape=(800, 800, 3), num_classes=91, paper=_MASK)
def maskrcnn_resnet50_fpn(**kwargs) -> MaskRCNN:
  """Mask R-CNN, ResNet-50-FPN (torchvision's v1 `maskrcnn_resnet50_fpn`)."""
  return MaskRCNN(**kwargs)


@register_model(input_shape=(96, 96, 3), num_classes=5, paper=_FASTER)
def fasterrcnn_tiny(**kwargs) -> FasterRCNN:
  """Test variant: one basic block per stage (widths 8-64), 32-channel FPN, 64-wide box head,
  anchors of 8-128 px, fewer proposals (300 / 100 at test) for 64-128 px inputs."""
  return FasterRCNN(**_tiny(kwargs))


@register_model(input_shape=(96, 96, 3), num_classes=5, paper=_MASK)
def maskrcnn_tiny(**kwargs) -> MaskRCNN:
  """Test variant: fasterrcnn_tiny's, with a mask head of two 32-wide convs."""
  kwargs.setdefault("mask_layers", (32, 32))
  kwargs.setdefault("mask_dim_reduced", 32)
  return MaskRCNN(**_tiny(kwargs))
