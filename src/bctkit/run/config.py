"""Run configuration: a YAML file validated into typed objects, with ``key.path=value`` overrides.

Every check that can fail is made here, at load time: unknown keys, wrong types, unknown methods or
method options, and options that conflict (say, a backbone that expects 3 channels on 1-channel
data), so that nothing breaks an hour into training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from bctkit.data.allocation import ClassOrder, Scenario
from bctkit.data.datasets import DataConfig
from bctkit.errors import ConfigError
from bctkit.losses import validate_params
from bctkit.losses.base import method_class
from bctkit.models.config import BackboneConfig
from bctkit.oldside.config import OldConfig, check_old_classifier, check_upgrade
from bctkit.run.recipes import check_required
from bctkit.run.testsets import TestSetConfig, check_test_sets
from bctkit.training.config import ModelConfig, TrainConfig, margin_defaults
from bctkit.training.transformation import TransformTrainConfig

RESERVED_NAMES = ("old", "paragon")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AllocationConfig(_Strict):
    scenario: Scenario = "extended-data"
    ratio: float = Field(0.3, gt=0, lt=1)
    seed: int = 666
    # class splits: "random" (seeded draw) or "first" (the dataset's first classes, BT^2 / BCT)
    classes: ClassOrder = "random"

    @model_validator(mode="after")
    def _class_order(self) -> AllocationConfig:
        if self.classes != "random" and not self.scenario.endswith("-class"):
            raise ValueError(f"allocation.classes={self.classes!r} chooses the classes of a class split; "
                             f"scenario {self.scenario} splits every class's images")
        return self

    @model_serializer(mode="wrap")
    def _omit_default_order(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The default is left out of dumps, so run keys made before the option existed still match."""
        data = handler(self)
        if self.classes == "random":
            data.pop("classes", None)
        return data


class MethodConfig(_Strict):
    """A new model trained with a compatibility method against the old model."""

    method: str
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.method


class ChainVersion(MethodConfig):
    """One upgrade in a chain v1 <- v2 <- v3 ...: trained with ``method`` against the previous
    version (v1 is the run's old model). ``ratio``: the version trains on the allocation's old part
    drawn at this ratio (same seed, so the sets are nested and grow with the ratio); None: on the
    allocation's new training set, as the run's methods do. ``backbone``: this version's
    architecture (default: the run's ``new.backbone``), e.g. a wider embedding after a BT^2 model."""

    ratio: float | None = Field(None, gt=0, lt=1)
    backbone: BackboneConfig | None = None


class FeatureTransformConfig(_Strict):
    """An old-to-new transformation h, trained after the new models on the training images' (cached
    old feature, ``target``'s feature) pairs: FCT (Ramanujan et al., CVPR 2022), with FastFill's
    uncertainty (Jaeckle et al., ICLR 2023) when ``uncertainty``. ``target``: the new model h maps
    into (a method's or chain version's name, or ``paragon``: FCT's independently trained new model;
    default: the paragon when the run trains one, else the first method). ``side_info``: a bctkit
    model file whose embedding of each image is stored beside the old vector (FCT's side
    information). The evaluation adds h(old) as a gallery model named ``name``."""

    name: str = "h(old)"
    target: str | None = None
    uncertainty: bool = True
    inner_dim: int = Field(2048, ge=1)
    side_info: str | None = None
    train: TransformTrainConfig = Field(default_factory=TransformTrainConfig)


class EvalConfig(_Strict):
    fars: list[float] = Field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2])
    topk: list[int] = Field(default_factory=lambda: [1, 5])
    fpirs: list[float] = Field(default_factory=lambda: [1e-2, 1e-1])
    retrieval: bool = True
    backfill: bool = True
    gallery_per_class: int = Field(1, ge=1)
    flip: bool = False
    batch_size: int = Field(512, ge=1)
    # Which held-out identities to evaluate on: "validation" (data.validation_classes) is for
    # choosing settings; its reports go to RUN_DIR/validation, beside the test reports.
    split: Literal["test", "validation"] = "test"
    # How the held-out set is evaluated (run.testsets.RUN_PROTOCOLS): split, or loo (leave-one-out).
    protocol: Literal["split", "loo"] = "split"
    # Test sets read from disk that every model is evaluated on after the run (run.testsets).
    test_sets: list[TestSetConfig] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Options at their defaults are left out, so configs dumped before they existed compare equal."""
        data = handler(self)
        if self.protocol == "split":
            data.pop("protocol", None)
        if not self.test_sets:
            data.pop("test_sets", None)
        return data

    @model_validator(mode="after")
    def _ranges(self) -> EvalConfig:
        if any(not 0 < f < 1 for f in self.fars + self.fpirs):
            raise ValueError(f"fars and fpirs must lie in (0, 1), got {self.fars} and {self.fpirs}")
        if any(k < 1 for k in self.topk):
            raise ValueError(f"topk values must be >= 1, got {self.topk}")
        return self


class CacheConfig(_Strict):
    """Old-feature cache: ``dir`` shared by runs that should reuse entries (default: OUT/cache)."""

    dir: str | None = None
    flip: bool = False
    dtype: Literal["float32", "float16"] = "float32"


class RunConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    allocation: AllocationConfig = Field(default_factory=AllocationConfig)
    old: OldConfig = Field(default_factory=OldConfig)
    new: ModelConfig = Field(default_factory=ModelConfig)
    methods: list[MethodConfig] = Field(default_factory=list)
    chain: list[ChainVersion] = Field(default_factory=list)
    transforms: list[FeatureTransformConfig] = Field(default_factory=list)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    # Per-allocation changes, merged into the config when that scenario runs: a mapping of sections
    # as at the top level, e.g. identical-data's upgraded architecture (see for_scenario).
    scenario_overrides: dict[Scenario, dict[str, Any]] = Field(default_factory=dict)
    # Train the paragon (the new architecture trained alone on the new data: the upper reference of
    # the update gain, and BT^2's targets); optional in upgrade mode, where training it costs much.
    paragon: bool = True

    @model_serializer(mode="wrap")
    def _omit_default_paragon(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.paragon:
            data.pop("paragon", None)
        if not self.transforms:  # configs dumped before transforms existed compare equal
            data.pop("transforms", None)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        check_upgrade(self)
        check_test_sets(self)
        for m in [*self.methods, *self.chain]:  # a method's own train section trains the new head
            if m.train is not None:
                object.__setattr__(m, "train", margin_defaults(self.new.head, m.train))
        # An external old model reads images through its own transform (checked when it is loaded).
        sides = [] if self.old.external else [("old", self.old.backbone)]
        sides.append(("new", self.new.backbone))
        sides += [(f"chain.{i}", v.backbone) for i, v in enumerate(self.chain) if v.backbone is not None]
        for side, bb in sides:
            # File datasets without a transform are checked when the first image is read.
            if self.data.channels is not None and bb.in_channels != self.data.channels:
                raise ValueError(
                    f"{side}.backbone.in_channels={bb.in_channels} conflicts with the data's "
                    f"{self.data.channels} channel(s)"
                )
            hw = self.data.image_size
            if hw is not None and bb.input_shape[1:] != hw:
                size = hw[0] if hw[0] == hw[1] else list(hw)
                raise ValueError(
                    f"{side}.backbone.image_size={bb.image_size} conflicts with the data's image "
                    f"size {size}"
                )
        if self.data.eval_images_per_class <= self.evaluation.gallery_per_class:
            raise ValueError(
                f"evaluation.gallery_per_class={self.evaluation.gallery_per_class} leaves no probes "
                f"with data.eval_images_per_class={self.data.eval_images_per_class}"
            )
        if (self.evaluation.split == "validation" and self.data.validation is None
                and self.data.validation_classes < 2):
            raise ValueError(
                f"evaluation.split=validation needs data.validation_classes >= 2 (identities kept apart "
                f"from training and test) or a data.validation source, got {self.data.validation_classes}"
            )
        trains = [("old", self.old.head, self.old.train), ("new", self.new.head, self.new.train)]
        trains += [(f"methods.{i}", self.new.head, m.train) for i, m in enumerate(self.methods) if m.train]
        trains += [(f"chain.{i}", self.new.head, v.train) for i, v in enumerate(self.chain) if v.train]
        for side, head, train in trains:
            if train.partial_fc.active and head.type == "softmax":
                raise ValueError(f"{side}.train.partial_fc needs a cosine-margin head (normface, cosface, "
                                 "arcface), not softmax")
        seen: set[str] = set()
        for m in [*self.methods, *self.chain]:
            if m.method == "independent" and m.name is None:
                raise ValueError("'independent' is the paragon, which every run trains; remove it")
            name = m.display_name
            if name in RESERVED_NAMES or name in seen:
                raise ValueError(f"method name {name!r} is reserved or used twice; set a unique 'name'")
            seen.add(name)
        for i, t in enumerate(self.transforms):
            if t.name in RESERVED_NAMES or t.name in seen:
                raise ValueError(f"transforms.{i}: name {t.name!r} is reserved or used twice; set a unique "
                                 "'name'")
            seen.add(t.name)
            targets = [*(["paragon"] if self.paragon else []), *(m.display_name for m in self.methods),
                       *(v.display_name for v in self.chain)]
            if t.target is None:
                if not targets:
                    raise ValueError(f"transforms.{i}: no new model to map into (no paragon, methods or "
                                     "chain)")
                object.__setattr__(t, "target", targets[0])
            elif t.target not in targets:
                raise ValueError(f"transforms.{i}: target {t.target!r} is not a new model of this run; "
                                 f"expected one of {targets}")
            if t.side_info is not None and not Path(t.side_info).exists():
                raise ValueError(f"transforms.{i}: side_info {t.side_info!r}: no such model file")
        return self


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {dotted}: {key!r} is not an index of a {len(node)}-item list")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:i])!r} is not a section")


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping gives the same key twice (plain YAML loaders keep the last silently)."""

    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(problem=f"duplicate key {key!r}", problem_mark=again)
        self.key, self.first_line, self.line = key, first.line + 1, again.line + 1

    def describe(self) -> str:
        return f"duplicate key {self.key!r} (line {self.line}; first at line {self.first_line})"


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a duplicate key. Keys brought in by a merge
    (``<<: *anchor``) may still be overridden by the mapping's own keys, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if first is not key_node.start_mark:
                    raise DuplicateKeyError(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely, refusing duplicate keys (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=StrictLoader)


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML (so 0.1, true, [1, 2] work)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            value = load_yaml(raw)
        except DuplicateKeyError as exc:
            raise ConfigError(f"--set {item!r}: {exc.describe()}") from None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: value is not valid YAML") from None
        _set_path(tree, key.strip(), value)
    return tree


def _validate(tree: dict[str, Any], source: str) -> RunConfig:
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_error(exc)}") from None
    for i, m in enumerate(cfg.methods):
        try:
            _check_method(m, cfg.old.backbone, cfg.new.backbone, cfg.new.train)
            check_old_classifier(m, cfg.old)
        except ConfigError as exc:
            raise ConfigError(f"{source}: methods.{i}: {exc}") from None
    prev = cfg.old.backbone
    for i, m in enumerate(cfg.chain):
        try:
            prev = _check_method(m, prev, m.backbone or cfg.new.backbone, cfg.new.train)
        except ConfigError as exc:
            raise ConfigError(f"{source}: chain.{i}: {exc}") from None
    return cfg


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def for_scenario(cfg: RunConfig, scenario: Scenario, source: str = "config") -> RunConfig:
    """The config that allocation ``scenario`` runs with: ``allocation.scenario`` set and that
    scenario's ``scenario_overrides`` merged in, checked as a whole like any config. identical-data
    is the same data with a new architecture (methods.md), so there the new backbone must differ
    from the old one: otherwise the "upgrade" retrains the old model."""
    patch = cfg.scenario_overrides.get(scenario, {})
    where = f"{source}: scenario_overrides.{scenario}" if patch else source
    alloc_patch = patch.get("allocation")
    if "scenario_overrides" in patch or (isinstance(alloc_patch, dict) and "scenario" in alloc_patch):
        raise ConfigError(f"{where}: may not set scenario_overrides or allocation.scenario")
    tree = _merge(cfg.model_dump(mode="json", exclude={"scenario_overrides"}), patch)
    if cfg.old.external:  # upgrade mode: no allocation (check_upgrade refuses one)
        tree.pop("allocation")
        return _validate(tree, where)
    tree["allocation"] = {**tree["allocation"], "scenario": scenario}
    eff = _validate(tree, where)
    if scenario == "identical-data" and eff.new.backbone == eff.old.backbone:
        raise ConfigError(
            f"{where}: identical-data trains the new model on the old model's own images, so the upgrade "
            "is a new architecture, but new.backbone equals old.backbone; set "
            "scenario_overrides.identical-data.new.backbone (or new.backbone) to the new architecture"
        )
    return eff


def parse_config(tree: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a config tree into a RunConfig, including every method's options and dimensions, and
    the config of its own scenario and of every scenario it overrides."""
    cfg = _validate(tree, source)
    for scenario in dict.fromkeys([cfg.allocation.scenario, *cfg.scenario_overrides]):
        for_scenario(cfg, scenario, source)
    return cfg


def _check_method(
    m: MethodConfig, old: BackboneConfig, new: BackboneConfig, train: TrainConfig
) -> BackboneConfig:
    """Validate one method (training ``new``) against the model it must be compatible with; returns
    the backbone config the method trains (``new`` widened if the method widens it)."""
    term = method_class(m.method)(validate_params(m.method, m.params))
    term.check_dims(old.output_dim, new.embedding_dim)
    term.check_train((m.train or train).epochs)
    if old.bt2 is not None and term.uses_old_classifier():
        raise ConfigError(
            f"{m.display_name}: the previous model is a BT^2 model, whose classifier scores f, not its "
            "stored embedding; use a method that needs only its features (bct: new_classes=synthesize_all)"
        )
    return term.backbone_config(new, old.output_dim)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (None: all defaults), apply overrides, validate. The file must be UTF-8
    and may not give a key twice in one mapping."""
    tree: Any = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            tree = load_yaml(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
        except DuplicateKeyError as exc:
            raise ConfigError(f"{path}: {exc.describe()}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    tree = apply_overrides(tree, overrides or [])
    check_required(tree, source)
    return parse_config(tree, source)


def packaged_config(name: str) -> Path:
    """Path of a config shipped inside the package (bctkit/configs/NAME.yaml)."""
    path = Path(__file__).parent / "configs" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(
            f"{name}: no such config file, and no packaged config of that name (packaged: {known})"
        )
    return path
