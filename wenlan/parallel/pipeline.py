"""Pipeline parallelism: BriVL as a DeepSpeed ``PipelineModule`` (pipeline x data parallel, ZeRO-0/1).

The model is not rewritten for the pipeline: a BriVL is built from the same presets as for the other
engines (its parameters on the meta device, so no rank holds the whole model), and each tower's
``blocks()`` become pipeline layers in order: image stem, image blocks, region pooling, image attention
layers, image head, text embeddings, BERT layers, text attention layers, text head, then the objective.
DeepSpeed's partitioner balances the layers over the stages by a per-layer cost
(``pipeline.partition_method``): trainable parameters ("parameters", DeepSpeed's method, the default)
or the layer's forward FLOPs for one sample counted on the meta device ("flops"). Parameters are a poor
proxy for time in a two-tower transformer: in the 1b preset a ViT block does 808 FLOPs per parameter
on its 197 tokens and a BERT layer 324 on its 80, and the text embeddings hold 22M parameters and do
no matmul, so ``pipe_10b.json`` asks for "flops". FLOPs in turn undercount memory-bound layers
(depthwise convolutions, GroupNorm): the tiny CNN preset's stages are closer in time by parameters.
Each rank then allocates and initialises only its own stage's layers (``init_module_`` seeds by module
name, so the weights equal a plain build's).

Each layer holds one block of the online tower AND the same block of its momentum copy, so the EMA
update stays local to a stage. Between stages a layer's output carries, per modality, one float tensor
with the online activations (B rows) stacked on the momentum activations (B rows): DeepSpeed gives
every float tensor it receives ``requires_grad`` and sends a gradient back for each, and a stacked
tensor gets one (zero on the momentum half) where a separate momentum tensor would have none. Token
ids and the attention mask are integer tensors and travel without gradients. The layers a modality
has not reached yet, or has passed, hand its tensors through untouched.

Queues, temperature and loss live on the last stage (``ObjectiveLayer``); their all-gathers run over
the last stage's data-parallel group only.
"""

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from wenlan.data.transforms import model_images
from wenlan.losses.objective import ContrastivePretraining, caption_ids
from wenlan.models.brivl import BriVL, set_key_tower_modes
from wenlan.models.init import init_module_, parameters_on_meta

SEPARATOR = "__"  # a layer registers model.image_tower.head as model__image_tower__head


PARTITION_METHODS = ("parameters", "flops")


def pipeline_stages(ds_config: dict) -> int:
    """Pipeline stages asked for by a DeepSpeed config's ``pipeline.stages`` (1: no pipeline)."""
    stages = ds_config.get("pipeline", {}).get("stages", 1)
    return 1 if stages in (None, "auto") else int(stages)


def partition_method(ds_config: dict) -> str:
    """What the stages balance, from ``pipeline.partition_method``: "parameters" (default) or "flops"."""
    return ds_config.get("pipeline", {}).get("partition_method", "parameters")


def plain_name(layer_key: str) -> str:
    """A pipeline layer's state-dict key -> the tensor's name in the plain engine's module."""
    head, _, rest = layer_key.partition(".")
    name = head.replace(SEPARATOR, ".")
    return f"{name}.{rest}" if rest else name


def _owner(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


class TowerLayer(nn.Module):
    """Block ``index`` of one tower, online and momentum. Activations in and out:
    image layers  (image (2B|B, ...), input_ids, attention_mask)
    text layers   (image (2B, E), [text (2B, L, H)], input_ids, attention_mask)
    where the first layer of a tower reads the raw batch (B rows) and the others the stacked
    (online; momentum) rows. Without momentum towers (clip) there is no momentum half."""

    def __init__(self, model: BriVL, kind: str, index: int):
        super().__init__()
        self.kind, self.index = kind, index
        self.towers = [("model.", getattr(model, f"{kind}_tower"))]
        if model.momentum_image_tower is not None:
            self.towers.append(("model.momentum_", getattr(model, f"momentum_{kind}_tower")))
        self.blocks = [tower.blocks()[index] for _, tower in self.towers]  # (online, momentum)
        for prefix, tower in self.towers:
            for path in self.blocks[0].owns:
                parent, name = _owner(tower, path)
                owned = getattr(parent, name)
                key = f"{prefix}{kind}_tower.{path}".replace(".", SEPARATOR)
                if isinstance(owned, nn.Parameter):
                    self.register_parameter(key, owned)
                else:
                    self.add_module(key, owned)

    def train(self, mode: bool = True) -> "TowerLayer":
        super().train(mode)
        if mode:
            set_key_tower_modes(self)  # as BriVL.train: no dropout in the momentum half, frozen BatchNorm
        return self

    def named_momentum_pairs(self):
        """(momentum name, online parameter, momentum parameter) of this layer, for the EMA."""
        if len(self.towers) < 2:
            return
        params = dict(self.named_parameters())
        for key, p in params.items():
            name = plain_name(key)
            if name.startswith("model.momentum_"):
                yield name, params[key.replace(f"model{SEPARATOR}momentum_", f"model{SEPARATOR}", 1)], p

    @torch.no_grad()
    def materialize(self, device) -> None:
        """Allocate this layer's parameters (meta until now) on ``device``, NaN-filled so that anything
        initialisation misses is caught; the towers see the same tensors."""
        for prefix, tower in self.towers:
            for path in self.blocks[0].owns:
                parent, name = _owner(tower, path)
                owned = getattr(parent, name)
                modules = [(parent, name)] if isinstance(owned, nn.Parameter) else \
                    [(m, n) for m in owned.modules() for n in list(m._parameters)]
                for module, pname in modules:
                    p = module._parameters[pname]
                    if p is None or p.device.type != "meta":
                        continue
                    new = nn.Parameter(torch.full(p.shape, float("nan"), dtype=p.dtype, device=device),
                                       requires_grad=p.requires_grad)
                    module._parameters[pname] = new
                    if module is parent and isinstance(owned, nn.Parameter):  # registered here too
                        self._parameters[f"{prefix}{self.kind}_tower.{path}".replace(".", SEPARATOR)] = new

    def forward(self, acts: tuple) -> tuple:
        if self.kind == "image":
            x, rest, context = acts[0], acts[1:], ()
        else:
            started = len(acts) == 4
            x = acts[1] if started else None
            rest, context = (acts[0],), acts[-2:]
        first = self.index == 0
        online, momentum = self.blocks[0], self.blocks[1] if len(self.blocks) > 1 else None
        if momentum is None:
            out = online.run(x, *context)
        else:
            q, k = (x, x) if first else x.chunk(2)  # first block: the raw batch feeds both towers
            with torch.no_grad():
                key = momentum.run(k, *context)
            out = torch.cat([online.run(q, *context), key])  # (2B, ...): online rows, then momentum rows
        if self.kind == "image":
            return (out, *rest)
        return (rest[0], out, *context)


class ObjectiveLayer(ContrastivePretraining):
    """The last layer: temperature and queues. Its forward hands the embeddings through; DeepSpeed calls
    ``loss`` with them and the micro-batch's caption ids. The objective keeps the step's keys and loss
    totals, as on the plain path."""

    def __init__(self, cfg, embed_dim: int, group=None):
        super().__init__(None, cfg, group=group, embed_dim=embed_dim)
        self.use_queue = True  # set by the trainer per step (queue warm-up)

    def forward(self, acts: tuple) -> tuple:
        return acts

    def loss(self, outputs: tuple, ids: torch.Tensor) -> torch.Tensor:
        image, text = outputs[0], outputs[1]  # (2B, E) each, or (B, E) without momentum towers
        B = ids.shape[0]
        keys = (image[B:], text[B:]) if self.cfg.name == "brivl" else (None, None)
        return self.objective(image[:B], text[:B], *keys, ids, self.use_queue)


def data_parallel_groups(stages: int) -> tuple[int, int, object]:
    """(stage, data-parallel rank, data-parallel group) of this rank in DeepSpeed's pipe x data grid
    (rank = stage * D + d). Every rank creates every stage's group, in order, as new_group requires."""
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = world // stages
    groups = [dist.new_group(list(range(s * dp, (s + 1) * dp))) for s in range(stages)]
    return rank // dp, rank % dp, groups[rank // dp]


def pipeline_layers(model: BriVL, objective: ObjectiveLayer) -> list[nn.Module]:
    """Every block of the image tower, then of the text tower, then the objective."""
    return [TowerLayer(model, kind, i) for kind in ("image", "text")
            for i in range(len(getattr(model, f"{kind}_tower").blocks()))] + [objective]


def layer_costs(layers: list[nn.Module], model_cfg, method: str) -> list[int]:
    """What the partitioner balances, per layer of a model on the meta device: its trainable parameter
    count ("parameters"), or the FLOPs of its forward for one sample ("flops"; online and momentum
    halves, so the backward, about twice the online forward in every layer, keeps the same ranking)."""
    if method == "parameters":
        return [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]
    from torch.utils.flop_counter import FlopCounterMode

    size, length = model_cfg.image.image_size, model_cfg.text.max_len
    acts = (torch.zeros(1, 3, size, size, device="meta"), torch.zeros(1, length, dtype=torch.long, device="meta"),
            torch.ones(1, length, dtype=torch.long, device="meta"))
    costs = []
    for layer in layers:
        with FlopCounterMode(display=False) as counter:
            acts = layer(acts)
        costs.append(counter.get_total_flops())
    return costs


def balanced_parts(costs: list[int], stages: int) -> list[int]:
    """Stage boundaries with balanced summed costs (DeepSpeed's partition_balanced)."""
    from deepspeed.runtime.utils import partition_balanced

    parts = partition_balanced(weights=costs, num_parts=stages)
    if any(parts[s] == parts[s + 1] for s in range(stages)):
        raise ValueError(f"pipeline.stages={stages}: the model has {len(costs)} pipeline layers and some stage "
                         "would get none of them; use fewer stages")
    return parts


_layouts: dict[str, tuple[list[int], list[int]]] = {}  # check_stages' results in this process


def check_stages(model_cfg, objective_cfg, stages: int, method: str = "parameters") -> tuple[list[int], list[int]]:
    """(stage boundaries, per-layer costs) that ``build_pipeline`` will use, from a model on the meta
    device: a layout that cannot work fails here, before any process group starts. Computed once per
    process (config validation and the build ask for the same layout; a 10b meta model takes seconds)."""
    key = repr((model_cfg, objective_cfg, stages, method))  # dataclass reprs: every field
    if key not in _layouts:
        with torch.device("meta"):
            model = BriVL(model_cfg, momentum=objective_cfg.uses_momentum)
            objective = ObjectiveLayer(objective_cfg, model_cfg.embed_dim)
        costs = layer_costs(pipeline_layers(model, objective), model_cfg, method)
        _layouts[key] = balanced_parts(costs, stages), costs
    return _layouts[key]


def build_pipeline(cfg, stages: int):
    """The pipeline module of ``cfg``'s BriVL over ``stages`` stages, this rank's layers allocated and
    initialised (seeded like the plain build, then the configured pretrained weights); returns
    (PipelineModule, this rank's ObjectiveLayer or None, MomentumEMA pairs of this rank's layers)."""
    from deepspeed.pipe import PipelineModule
    from transformers.initialization import no_init_weights

    stage, dp_rank, dp_group = data_parallel_groups(stages)
    with parameters_on_meta(), no_init_weights():
        model = BriVL(cfg.model, momentum=cfg.objective.uses_momentum)
    last = stage == stages - 1
    with contextlib.nullcontext() if last else torch.device("meta"):
        objective = ObjectiveLayer(cfg.objective, cfg.model.embed_dim, group=dp_group if last else None)
    layers = pipeline_layers(model, objective)
    parts, costs = check_stages(cfg.model, cfg.objective, stages, partition_method(cfg.deepspeed_config))
    local = layers[parts[stage]:parts[stage + 1]]
    device = torch.device("cpu")
    for layer in local:
        if isinstance(layer, TowerLayer):
            layer.materialize(device)
            _init_layer(layer, cfg.seed)
    _copy_pretrained(model, local, cfg.init_from)
    for layer in local:
        bad = [n for n, p in layer.named_parameters() if not n.startswith(f"model{SEPARATOR}momentum_")
               and torch.isnan(p).any()]
        if bad:
            raise RuntimeError(f"parameters without an initialisation rule (wenlan.models.init): {bad[:5]}")
    class CostBalanced(PipelineModule):
        """DeepSpeed's "parameters" partitioning, fed our per-layer costs instead of parameter counts."""

        def _count_layer_params(self):
            return costs

    pipe = CostBalanced(layers=layers, num_stages=stages, loss_fn=objective.loss, partition_method="parameters",
                        activation_checkpoint_interval=cfg.deepspeed_config.get("pipeline", {}).get(
                            "activation_checkpoint_interval", 0))
    if list(pipe.parts) != list(parts) or pipe.stage_id != stage:
        raise RuntimeError(f"pipeline partition differs from DeepSpeed's: {parts} vs {pipe.parts}")
    pairs = [pair for layer in local if isinstance(layer, TowerLayer) for pair in layer.named_momentum_pairs()]
    return pipe, objective if last else None, pairs, (stage, dp_rank, dp_group)


def _init_layer(layer: TowerLayer, seed: int) -> None:
    """``init_module_`` on the online modules of a layer under their plain names (the momentum half is
    copied from them by the EMA's first step); a module owning a single parameter of the block (a
    position embedding) is initialised as a whole, as in the plain build."""
    prefix, tower = layer.towers[0]
    for path in layer.blocks[0].owns:
        parent, name = _owner(tower, path)
        owned = getattr(parent, name)
        base = f"{prefix}{layer.kind}_tower"
        if isinstance(owned, nn.Parameter):
            parent_path = path.rpartition(".")[0]
            init_module_(parent, f"{base}.{parent_path}" if parent_path else base, seed)
        else:
            for sub_name, sub in owned.named_modules():
                init_module_(sub, f"{base}.{path}.{sub_name}" if sub_name else f"{base}.{path}", seed)


@torch.no_grad()
def _copy_pretrained(model: BriVL, local: list[nn.Module], init_from: str | None) -> None:
    """The configured pretrained weights, then the --init-from file's, into this rank's layers."""
    if not any(isinstance(layer, TowerLayer) for layer in local):
        return
    from wenlan.export import TowerFile

    sources = [("pretrained weights", model.pretrained_state())]
    if init_from:
        sources.append(("--init-from", TowerFile(init_from)))
    for what, state in sources:
        for layer in local:
            for key, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
                name = plain_name(key).removeprefix("model.")
                if name in state:
                    value = state[name]
                    if value.shape != tensor.shape:
                        raise ValueError(f"{what}: {name} has shape {tuple(value.shape)}, the model "
                                         f"expects {tuple(tensor.shape)}")
                    tensor.copy_(value)


@torch.no_grad()
def evaluate_pipeline(engine, cfg, tokenizer, image_dtype) -> dict:
    """Retrieval metrics of the online towers through the pipeline (``wenlan.evaluate``'s metrics on the
    same validation pairs), on every rank. Every rank walks the validation set in micro-batches of the
    training size (the shapes between stages are fixed), the last batch padded; the last stage's first
    rank scores the embeddings and broadcasts the metrics."""
    from wenlan.data.pipeline import DataConfig, make_eval_loader
    from wenlan.evaluate import group_rows, retrieval_metrics

    micro = cfg.batch.micro_batch
    data = DataConfig(shards=list(cfg.val_shards), batch_size=micro, image_size=cfg.model.image.image_size,
                      max_text_len=cfg.model.text.max_len, num_workers=0, augment=False)
    images, texts, keys, skipped = [], [], [], 0
    for batch in make_eval_loader(data, tokenizer):
        skipped += sum(batch["skipped"].values())
        n = batch["images"].shape[0]
        if n == 0:
            continue
        keys.extend(batch["keys"])  # one row per caption: an image with several captions repeats
        pad = micro - n
        pixels, maps = batch["images"], batch["colour_maps"]
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        if pad:  # padding rows attend to one token so that nothing is all-masked; they are cut below
            pixels = torch.cat([pixels, pixels.new_zeros((pad, *pixels.shape[1:]))])
            maps = torch.cat([maps, maps.new_zeros((pad, *maps.shape[1:]))])
            input_ids = torch.cat([input_ids, input_ids.new_zeros((pad, input_ids.shape[1]))])
            mask = torch.cat([mask, torch.nn.functional.pad(mask.new_ones((pad, 1)), (0, mask.shape[1] - 1))])
        inputs = ((model_images(pixels, maps, engine.device, image_dtype), input_ids.to(engine.device),
                   mask.to(engine.device)),
                  caption_ids(input_ids).to(engine.device))
        engine.total_loss = None  # eval_batch adds its outputs to training's loss sum, which it does not reset
        _, outputs = engine.eval_batch(iter([inputs]), return_logits=True, compute_loss=False,
                                       reduce_output=None, bcast_loss=False, num_micro_batches=1)
        if engine.is_last_stage():
            images.append(outputs[0][:n].float().cpu())  # online rows only
            texts.append(outputs[1][:n].float().cpu())
    source = engine.grid.stage_to_global(engine.num_stages - 1, data=0)  # the last stage's first rank
    result = [None]
    if dist.get_rank() == source:
        first_rows, caption_image = group_rows(keys)
        metrics = retrieval_metrics(torch.cat(images)[first_rows], torch.cat(texts), caption_image)
        result = [dict(metrics, skipped=skipped)]
    dist.broadcast_object_list(result, src=source)  # a small dict, no gradient
    engine.module.train()
    return result[0]
