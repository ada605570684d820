"""The base config: every key the trainer reads is defined here, once, with its meaning.

Experiment files start from `base.get_config()` and override a few keys. The trainer locks
the result, so a misspelt `--config.key=value` is an error instead of a silent no-op.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Every key with its default."""
  del arg
  c = ml_collections.ConfigDict()

  # --- Model ---------------------------------------------------------------------------------
  c.model = "lenet"  # registry name, see jaxvision.list_models()
  c.model_kwargs = ml_collections.ConfigDict()  # extra constructor kwargs, e.g. {'stem': 'small'}
  c.num_classes = 0  # 0: take it from the dataset
  # 'classification' | 'segmentation' | 'multitask' | 'detection' | 'captioning' | 'auto' (from
  # the dataset)
  c.task = "auto"
  c.dtype = "float32"  # computation dtype ('float32' | 'bfloat16'); parameters stay float32

  # --- Data ----------------------------------------------------------------------------------
  # URI: digits | tfds:NAME | idx:DIR | folder:DIR | segfolder:DIR | synthetic:HxWxC:K
  c.dataset = "digits"
  c.train_split = "train[:80%]"  # TFDS slicing syntax, for every source
  c.eval_split = "train[80%:]"  # '' disables evaluation
  c.image_size = 28  # model input height = width (sources resize or crop to it)
  # Captioning only: the model input's width when it is not image_size, e.g. 140 for 28 x 140
  # strips (each image resized to image_size x image_width); 0: square.
  c.image_width = 0
  c.batch_size = 128  # global batch, over all devices and processes
  c.eval_batch_size = 0  # 0: same as batch_size
  # A description of the data, written by the trainer when it resolves the config (never set it
  # by hand): every builder (model, task, tools) reads it from the run's config.json.
  c.data_info = ml_collections.ConfigDict()
  c.data_info.image_shape = (0, 0, 0)  # (H, W, C) of the training images, as the model sees them
  c.data_info.train_examples = 0  # examples in train_split
  c.data_info.eval_examples = 0  # examples in eval_split
  c.data_info.steps_per_epoch = 0  # full global batches per epoch of train_split
  c.data_info.class_names = ()  # class names when the source has them (folder names, TFDS)
  c.data = ml_collections.ConfigDict()
  c.data.normalize = "none"  # none | half | imagenet | mnist | cifar10, or '(m,m,m),(s,s,s)'
  c.data.prefetch = 2  # host batches prepared ahead in a background thread (and on device)
  c.data.skip_bad = False  # skip unreadable images (counted in the log) instead of stopping
  # Draw each epoch's order so that every class is equally likely (with replacement;
  # jaxvision.imbalance.balanced_epoch_order) instead of a uniform permutation.
  c.data.balanced_sampling = False
  # Comma-separated augmentations, e.g. 'inception_crop,flip,randaug(2,9),erase(0.25)' or, for
  # segmentation, 'crop,flip,rot90,elastic,jitter' (all names: jaxvision/data/augment.py).
  c.data.augment = ""
  c.data.workers = 0  # threads decoding / augmenting examples on each host (0: one per CPU core)
  # Eval resize: the center square of this fraction of the shorter side, resized to image_size
  # (images that are already image_size x image_size are used as they are).
  c.data.eval_crop = 0.875
  c.data.cache_mb = 4096  # folder / tfds: decode into host memory up to this size, else stream
  c.data.stream = "auto"  # tfds: auto (stream if over cache_mb or sizes vary) | always | never
  c.data.shuffle_buffer = 16384  # tfds streaming: examples in the shuffle buffer
  c.data.tfds_dir = ""  # tfds: data_dir of prepared datasets ('': TFDS default, $TFDS_DATA_DIR)
  # Largest image (width x height) a file may have: larger ones stop the run with one line naming
  # the file (or are skipped with skip_bad) before any pixel is decoded. 0: PIL's own
  # decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS (89.5 million); above it, PIL's is raised.
  c.data.max_image_pixels = 0
  # segfolder: the mask pixel values in class order, e.g. (0, 255) or (0, 128, 255); a value not
  # listed is an error. Empty: mask values are class indices (below num_classes when it is set,
  # else exactly 0..K-1 over the data), or 0/255 for binary masks (2 classes).
  c.data.mask_values = ()
  # Detection (coco:): also read each annotation's instance mask (its segmentation) and give the
  # batch `masks` uint8 [B, max_boxes, image_size, image_size]; off, box-only runs carry none.
  c.data.masks = False

  # --- Schedule of the run -------------------------------------------------------------------
  c.total_steps = 1000  # optimizer steps (ignored when num_epochs > 0)
  c.num_epochs = 0.0  # > 0: train this many epochs of train_split instead of total_steps
  c.log_every = 50  # steps between train metric lines
  c.eval_every = 500  # steps between evaluations (and at the end); 0: only at the end
  c.checkpoint_every = 500  # steps between checkpoints (and at the end); 0: only at the end
  c.keep_checkpoints = 3  # most recent checkpoints kept (the best one is kept as well)
  c.best_metric = "accuracy"  # eval metric that picks the best checkpoint; '' disables
  c.best_mode = "max"  # 'max' | 'min'
  # > 0: end this run early at that step, as if preempted (the schedule is unchanged).
  c.stop_at_step = 0
  c.seed = 0  # one seed for init, data order, dropout and augmentation

  # --- Optimization --------------------------------------------------------------------------
  c.optimizer = "adam"  # sgd | momentum | nesterov | adam | adamw | lamb | lars
  c.learning_rate = 1e-3  # peak learning rate
  c.momentum = 0.9  # sgd momentum / lars momentum
  c.b1 = 0.9  # adam-family first moment decay
  c.b2 = 0.999  # adam-family second moment decay
  c.schedule = "constant"  # constant | warmup_cosine | warmup_linear | piecewise
  c.warmup_steps = 0  # linear warm-up from 0 to learning_rate
  c.end_learning_rate = 0.0  # final value of cosine / linear decay
  c.decay_boundaries = ()  # piecewise: steps (or fractions of total_steps when < 1) where ...
  c.decay_factor = 0.1  # ... the learning rate is multiplied by this
  c.weight_decay = 0.0  # decoupled for adamw/lamb/lars, L2 added to the gradient for sgd-family
  c.grad_clip_norm = 0.0  # > 0: clip the global gradient norm
  c.grad_accum_steps = 1  # micro-batches per optimizer step (batch_size is the whole step)
  c.ema_decay = 0.0  # > 0: keep an EMA of the parameters; eval uses it
  c.label_smoothing = 0.0
  # Per-class weights of the training cross-entropy, e.g. (1.0, 5.0) for a rare class 1; () for
  # none. jaxvision.imbalance.class_weights(labels, K) computes inverse-frequency weights.
  c.class_weights = ()
  c.mixup_alpha = 0.0  # > 0: mixup on device with this Beta(alpha, alpha)
  c.cutmix_alpha = 0.0  # > 0: cutmix on device (alternates with mixup when both are on)
  c.init_from = ""  # checkpoint dir or converted weights (.npz / .msgpack) to start from
  # Regex over '/'-joined parameter paths that init_from leaves as initialised, e.g.
  # '^(fc1|fc2|head)/' to reuse only a network's convolutions (train.transfer).
  c.init_skip = ""
  c.freeze = ""  # regex over '/'-joined parameter paths that stay fixed, e.g. '^(?!head/)'
  # Regex over parameter paths whose learning rate is scaled_lr_factor times the schedule's, e.g.
  # '^backbone/' with 0.1 (DETR trains its backbone ten times slower than its transformer).
  c.scaled_lr_params = ""
  c.scaled_lr_factor = 1.0

  # --- Parallelism ---------------------------------------------------------------------------
  c.parallel = "mesh"  # 'mesh': jit over a device mesh | 'pmap': the same step under jax.pmap
  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0  # use the first N devices of this process (0: all); single process only
  c.mesh.data = -1  # devices along the data axis (-1: all that fsdp leaves)
  c.mesh.fsdp = 1  # > 1: shard parameters and optimizer state over this many devices

  # --- Multi-task (task='multitask': a classification head and a regression head) -------------
  c.multitask = ml_collections.ConfigDict()
  c.multitask.target = "ink"  # regression target: 'ink' (% bright pixels) | 'label' (class index)
  c.multitask.regression_loss = "mse"  # 'mse' | 'mae' of the regression head (jaxvision.multitask)
  c.multitask.regression_weight = 1.0  # weight of the regression loss in the summed loss
  c.multitask.classification_weight = 1.0  # weight of the cross-entropy in the summed loss

  # --- Segmentation ----------------------------------------------------------------------------
  c.seg = ml_collections.ConfigDict()
  c.seg.loss = "cross_entropy"  # '+'-joined terms of cross_entropy | bce | dice, e.g. 'bce+dice'
  c.seg.class_weights = ()  # per-class weights of the cross-entropy ('' / () for none)
  c.seg.weight_map = False  # the U-Net paper's border weight map (segmentation.add_weight_map)
  c.seg.weight_map_w0 = 10.0  # weight map: extra weight w0 of the thinnest borders between cells
  c.seg.weight_map_sigma = 5.0  # weight map: border width sigma, in pixels
  # Test-time augmentation of evaluation: '' (off), 'dihedral' (the average over the 8
  # flips/rotations, as the U-Net paper's ISBI entry did) or 'hflip' (input and mirror image).
  c.seg.tta = ""
  # Also average over the input translated by 0 or tta_shift pixels down and right (0: off); for
  # per-patch decoders (Segmenter) half the patch size halves the grid the edges snap to.
  c.seg.tta_shift = 0
  c.seg.overlays = 5  # eval examples saved as overlay PNGs in the workdir at the end (0: none)

  # --- Detection (task='detection': ssd*, retinanet*, fcos*, fasterrcnn*, maskrcnn*, detr*
  # models on coco: / voc: / yolo: data) ----------------------------------------------------------
  c.detection = ml_collections.ConfigDict()
  # 'auto' (the model's family) | 'ssd' | 'retinanet' | 'fcos' | 'rcnn' | 'detr'
  c.detection.loss = "auto"
  c.detection.max_boxes = 100  # ground-truth boxes per image in a batch (padded, box_valid)
  # One-stage post-processing; values <= 0 take the family's torchvision defaults (score
  # threshold ssd .01 / retinanet .05 / fcos .2, NMS IoU .45 / .5 / .6, detections 200 / 300 /
  # 100, candidates per level or class before NMS 400 / 1000 / 1000). The R-CNNs post-process in
  # the model (model_kwargs.box_score_thresh, ...); DETR keeps max_detections (<= 0: every query).
  c.detection.score_threshold = 0.0
  c.detection.nms_iou = 0.0
  c.detection.max_detections = 0
  c.detection.pre_nms_top_k = 0
  c.detection.box_loss = "l1"  # RetinaNet's box term: l1 (torchvision) | smooth_l1 | giou
  c.detection.pictures = 5  # eval examples drawn with their detections at the end (0: none)
  # DETR's set loss: the cross-entropy weight of the "no object" class (the paper's eos_coef) and
  # the auxiliary losses of every decoder layer.
  c.detection.no_object_weight = 0.1
  c.detection.aux_loss = True

  # --- Captioning (task='captioning': vit_gpt2* models on coco_captions: / flickr: data) ------
  c.caption = ml_collections.ConfigDict()
  c.caption.max_len = 20  # caption tokens, the end token included; longer captions are cut
  # '': a word-level tokenizer built from the training captions; or a tokenizer.json path
  c.caption.tokenizer = ""
  c.caption.vocab = ()  # the word vocabulary, written when the config is resolved (never by hand)
  c.caption.min_count = 5  # word-level: rarer training words become <unk>
  c.caption.max_vocab = 0  # word-level: at most this many tokens (0: no limit)
  c.caption.decode = "greedy"  # evaluation decoding: 'greedy' | 'beam'
  c.caption.beam_width = 3  # beam search: hypotheses kept
  c.caption.length_penalty = 1.0  # beam search: log-prob / length ** this (Hugging Face's)
  c.caption.pictures = 8  # eval examples drawn with their caption and per-word attention

  # --- Output --------------------------------------------------------------------------------
  c.progress = "auto"  # 'auto' (bar on a TTY, plain lines otherwise) | 'bar' | 'lines' | 'none'
  return c
