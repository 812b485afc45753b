"""cuda-convnet's and cuda-convnet2's own model files, read with their meaning.

A cuda-convnet network is a pair: ``layers-X.cfg`` (the layers) and ``layer-params-X.cfg`` (learning rates,
momenta, weight decays, normalisation constants, costs' coefficients), joined by section name. :func:`merge` makes
one text of the pair (and of the image shape, which cuda-convnet takes from its data provider); a text whose data
layer has ``dataIdx`` is in cuda-convnet's form, and :func:`translate` turns its sections into this project's layers:

* ``type=data`` with ``dataIdx=0``: the images (``channels`` and ``size`` merged in); ``dataIdx=1``: the labels, which
  the loader gives: the layer goes, and only ``cost.logreg`` may read it;
* ``softmax`` read by ``cost.logreg`` (``inputs=labels,probs``): one softmax cost, named by the softmax, with the
  cost's ``coeff``;
* ``conv``, ``local`` (unshared weights; a bias per filter and output position, as cuda-convnet's, whatever
  ``sharedBiases`` says), ``pool`` with cuda-convnet's output-size rule (``rounding = up``: ``start``, ``outputsX``,
  the last window hanging over the edge), ``fc``, ``cmrnorm`` (cross-map LRN: ``scale`` / ``size``, ``pow``,
  ``minDiv`` = k, default 1), ``rnorm`` / ``cnorm`` (same-map response / contrast normalisation, the same keys:
  ``scale`` / ``size**2`` in the op), cuda-convnet2's ``eltsum`` (``coeffs``) and ``eltmax``, ``dropout`` /
  ``dropout2``, ``neuron`` (a ``type = neuron`` layer), ``pass`` (the graph copies between devices itself);
* ``neuron=`` on a layer without a neuron of its own (pool, ...): a ``type = neuron`` layer ``<name>_neuron`` after
  it, as cuda-convnet inserts one; neurons are :mod:`convnet.neurons`' (``tanh[a,b]`` with its parameters);
* ``epsW``/``epsB``/``momW``/``momB``/``wc``: absolute per-layer settings (``dexp[...]`` schedules too);
* performance hints ``partialSum``, ``sumWidth`` accepted; ``gpu=i`` a tower.

Anything else -- other types, neurons, keys or values this project does not implement -- is a
:class:`ModelFileError` naming the file, the section and the key.
"""
from __future__ import annotations

import configparser

from . import neurons


class CudaConvnetError(Exception):
    """One line naming the file(s), the section and the key (model_file turns it into a ModelFileError)."""


NOT_IMPLEMENTED = {
    "nailbed": "a bed-of-nails subsampling layer",
    "blur": "a Gaussian blur layer",
    "resize": "a resize layer",
    "rgb2yuv": "a colour transform",
    "rgb2lab": "a colour transform",
    "rscale": "a random-scale layer",
    "crop": "a crop layer",
    "concat": "a concatenation layer (give a layer several inputs instead)",
    "cost.sum2": "a sum-of-squares cost",
    "cost.crossent": "a cross-entropy cost",
    "cost.bce": "a binomial cross-entropy cost",
    "cost.dce": "a detection cross-entropy cost",
}

_LEARNED = {"initw": "initW", "initb": "initB", "epsw": "epsW", "epsb": "epsB", "momw": "momW", "momb": "momB",
            "wc": "wc", "neuron": "neuron"}
# cuda-convnet key (lower case) -> this project's key, per type; None: accepted and dropped (a performance hint,
# or a value checked by _check_value)
KEYS = {
    "conv": {"channels": "channels", "filters": "filters", "padding": "padding", "stride": "stride",
             "filtersize": "size", "groups": "groups", "partialsum": None, "sumwidth": None, "sharedbiases": None,
             "updateperiod": None, "wball": None, **_LEARNED},
    # cuda-convnet's local layers have a bias per filter and output position: its parser reads sharedBiases for
    # conv only, so here it is accepted and dropped as there
    "local": {"channels": "channels", "filters": "filters", "padding": "padding", "stride": "stride",
              "filtersize": "size", "groups": "groups", "partialsum": None, "sumwidth": None, "sharedbiases": None,
              "updateperiod": None, "wball": None, **_LEARNED},
    "fc": {"outputs": "outputs", "updateperiod": None, "wball": None, **_LEARNED},
    "pool": {"pool": "pool", "sizex": "size", "stride": "stride", "start": "start", "outputsx": "outputsX",
             "channels": "channels", "neuron": None},
    "cmrnorm": {"channels": "channels", "size": "size", "scale": "alpha", "pow": "beta", "mindiv": "k",
                "blocked": None, "neuron": None},
    "rnorm": {"channels": "channels", "size": "size", "scale": "scale", "pow": "pow", "mindiv": "minDiv",
              "neuron": None},
    "cnorm": {"channels": "channels", "size": "size", "scale": "scale", "pow": "pow", "mindiv": "minDiv",
              "neuron": None},
    "eltsum": {"coeffs": "coeffs", "neuron": None},
    "eltmax": {"neuron": None},
    "softmax": {},
    "neuron": {"neuron": None},
    "dropout": {"keep": "keep", "enable": None, "neuron": None},
    "dropout2": {"keep": "keep", "enable": None, "neuron": None},
    "pass": {"neuron": None},
    "cost.logreg": {"coeff": None, "topk": None},
}
OUR_TYPE = {"conv": "conv", "local": "local", "fc": "fc", "pool": "pool", "cmrnorm": "lrn", "rnorm": "rnorm",
            "cnorm": "cnorm", "eltsum": "eltsum", "eltmax": "eltmax", "softmax": "softmax", "dropout": "dropout",
            "dropout2": "dropout"}
COMMON = ("type", "inputs", "gpu")


def is_cuda_convnet(sections) -> bool:
    """Whether parsed sections (name -> {key: value}, keys lower case) are in cuda-convnet's form: a data layer
    with ``dataIdx``."""
    return any(items.get("type", "").strip().lower() == "data" and "dataidx" in items for items in sections.values())


def _read(text, source):
    cp = configparser.ConfigParser(inline_comment_prefixes=("#", ";"), interpolation=None, strict=True)
    try:
        cp.read_string(text, source=source)
    except configparser.Error as e:
        raise CudaConvnetError(f"{source}: cannot parse: {' '.join(str(e).split())}") from None
    return {sec: {k.lower(): v for k, v in cp.items(sec)} for sec in cp.sections()}


def merge(layers_text, layers_source, params_text=None, params_source=None, input_shape=None):
    """One model text from cuda-convnet's pair (the params file's sections merged into the layers file's by name),
    with ``input_shape`` (C, H, W) written into the image data layer when given. Returns (text, source)."""
    layers = _read(layers_text, layers_source)
    source = layers_source if params_text is None else f"{layers_source} + {params_source}"
    if params_text is not None:
        for sec, items in _read(params_text, params_source).items():
            if sec not in layers:
                raise CudaConvnetError(f"{params_source} [{sec}]: no layer '{sec}' in {layers_source}")
            for k, v in items.items():
                if k in layers[sec]:
                    raise CudaConvnetError(f"{params_source} [{sec}] {k}: also given in {layers_source}")
                layers[sec][k] = v
    if input_shape is not None:
        c, h, w = (int(v) for v in input_shape)
        for sec, items in layers.items():
            if items.get("type", "").strip().lower() == "data" and items.get("dataidx", "").strip() == "0":
                items.setdefault("channels", str(c))
                items.setdefault("size", f"{h},{w}" if h != w else str(h))
    lines = [f"# {source}: cuda-convnet's layer and parameter files, merged by section name"]
    for sec, items in layers.items():
        lines += ["", f"[{sec}]", *(f"{k} = {v}" for k, v in items.items())]
    return "\n".join(lines) + "\n", source


def _bool(v):
    t = v.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _check_value(t, key, v, where):
    """The dropped keys whose value must be the one this project computes."""
    try:
        if key == "sharedbiases" and t == "local":
            _bool(v)
        elif key == "sharedbiases" and not _bool(v):
            raise CudaConvnetError(f"{where} sharedBiases: 0 (a bias per filter and output position) is not "
                                   f"implemented; only shared biases (1)")
        if key == "blocked" and _bool(v):
            raise CudaConvnetError(f"{where} blocked: 1 (windows aligned to blocks of maps) is not implemented")
        if key == "updateperiod" and int(v) not in (0, 1):
            raise CudaConvnetError(f"{where} updatePeriod: {v.strip()} (an update every {v.strip()} batches) is not "
                                   f"implemented; only 0 or 1 (every batch)")
        if key == "wball" and float(v) != 0:
            raise CudaConvnetError(f"{where} wball: {v.strip()} (a norm constraint on the weights) is not "
                                   f"implemented; only 0")
        if key in ("partialsum", "sumwidth"):
            int(v)
    except ValueError:
        raise CudaConvnetError(f"{where} {key}: cannot read {v.strip()!r}") from None


def translate(sections, source):
    """cuda-convnet sections (name -> {key: value}, in file order) -> [(name, {key: value})] in this project's
    model-file spelling."""
    out = []  # [name, items] in order
    rename = {}  # a layer removed (pass, ident neuron, disabled dropout) -> the layers read instead (in order)
    neuron_of = {}  # a layer -> its detached neuron layer, which later layers read
    labels = set()
    softmaxes = {}  # softmax name -> its items in out (a cost.logreg sets coeff)

    def resolve(name):
        """The layers of ``out`` that reading ``name`` reads (a pass of several inputs: their concatenation)."""
        if name in rename:
            return rename[name]
        return [neuron_of.get(name, name)]

    gpu_of = {}  # a layer -> its gpu= (a tower), given or inherited from its first input
    lists = {items["gpu"].replace(" ", "") for items in sections.values() if "," in items.get("gpu", "")}
    single = any("gpu" in items and "," not in items["gpu"] for items in sections.values())
    replicated = lists.pop() if len(lists) == 1 and not single else None  # every gpu= one list: data parallelism

    for sec, items in sections.items():
        where = f"{source} [{sec}]"
        items = dict(items)
        t = items.get("type", "").strip().lower()
        if not t:
            raise CudaConvnetError(f"{where}: missing 'type'")
        if t in NOT_IMPLEMENTED:
            raise CudaConvnetError(f"{where} type: {t} ({NOT_IMPLEMENTED[t]}) is not implemented")
        if t == "data":
            idx = items.pop("dataidx", "0").strip()
            extra = sorted(set(items) - {"type", "channels", "size", "gpu"})
            if extra:
                raise CudaConvnetError(f"{where} {extra[0]}: not a key of a data layer (dataIdx, and channels, "
                                       f"size when the data provider's are not used)")
            if idx == "1":
                labels.add(sec)
                continue
            if idx != "0":
                raise CudaConvnetError(f"{where} dataIdx: {idx} (a third data stream) is not implemented; 0 is the "
                                       f"images, 1 the labels")
            if "channels" not in items or "size" not in items:
                raise CudaConvnetError(f"{where}: the image shape is the data provider's in cuda-convnet: give it "
                                       f"(--input-shape C,H,W; in Python input_shape=(C, H, W))")
            items.pop("gpu", None)
            out.append([sec, {"type": "data", "channels": items["channels"], "size": items["size"]}])
            continue
        if t not in KEYS:
            raise CudaConvnetError(f"{where} type: unknown layer type '{t}' (cuda-convnet's implemented here: "
                                   f"{', '.join(KEYS)}; known but not implemented: {', '.join(NOT_IMPLEMENTED)})")
        inputs = [s.strip() for s in items.pop("inputs", "").split(",") if s.strip()]
        if not inputs:
            raise CudaConvnetError(f"{where}: missing 'inputs'")
        known = KEYS[t]
        for k in items:
            if k not in known and k not in COMMON:
                raise CudaConvnetError(f"{where} {k}: not implemented for a cuda-convnet {t} layer (implemented: "
                                       f"{', '.join(sorted(known)) or 'none'})")
        gpu = items.pop("gpu", None)
        if gpu is not None and "," in gpu:
            if replicated is None:
                raise CudaConvnetError(f"{where} gpu: {gpu.strip()}: layers replicated on several GPUs next to layers "
                                       f"on other GPUs (data and model parallelism mixed) are not implemented")
            gpu = None  # the whole net replicated: one tower (the replicas' split of the batch is data parallelism)
        if gpu is None:  # cuda-convnet2: a layer without gpu= runs where its first input runs
            gpu = gpu_of.get(inputs[0].strip()) if inputs else None
        if gpu is not None:
            gpu_of[sec] = gpu
        enabled = _enabled(items, where) if t in ("dropout", "dropout2") else True
        if t == "cost.logreg":
            if len(inputs) != 2 or inputs[0] not in labels or len(resolve(inputs[1])) != 1 \
                    or resolve(inputs[1])[0] not in softmaxes:
                raise CudaConvnetError(f"{where} inputs: cost.logreg reads the labels data layer (dataIdx=1), then "
                                       f"a softmax layer; got {', '.join(inputs)}")
            try:
                coeff = float(items.get("coeff", "1"))
            except ValueError:
                raise CudaConvnetError(f"{where} coeff: expected a number, got {items['coeff']!r}") from None
            if coeff <= 0:
                raise CudaConvnetError(f"{where} coeff: {coeff:g}: a cost's coefficient must be > 0")
            softmaxes[resolve(inputs[1])[0]]["coeff"] = items.get("coeff", "1").strip()
            continue
        for i in inputs:
            if i in labels:
                raise CudaConvnetError(f"{where} inputs: '{i}' is the labels data layer, which only cost.logreg reads")
        if t in ("eltsum", "eltmax"):
            for i in inputs:
                if len(resolve(i)) != 1:  # its readers would see the joined inputs as one, not the parts
                    raise CudaConvnetError(f"{where} inputs: '{i}' is a pass layer of several inputs; an {t} of "
                                           f"their concatenation is not implemented")
        inputs = [r for i in inputs for r in resolve(i)]
        for k in list(items):
            if k in known and known[k] is None and k != "neuron":
                _check_value(t, k, items.pop(k), where)
        neuron = items.pop("neuron", "").strip() if known.get("neuron", "x") is None or t == "neuron" else None
        if t in ("pass", "neuron") or not enabled:
            if neuron:  # a neuron layer, or a layer that computes nothing but its neuron
                if _neuron(neuron, where) is not None:
                    layer = {"type": "neuron", "inputs": ",".join(inputs), "neuron": neuron}
                    if gpu is not None:
                        layer["gpu"] = gpu
                    out.append([sec, layer])
                    continue
            if len(inputs) != 1 and t != "pass":
                raise CudaConvnetError(f"{where} inputs: a {t} layer reads one layer, got {', '.join(inputs)}")
            rename[sec] = inputs  # a pass of several: its readers join them (cuda-convnet2 concatenates them)
            continue
        layer = {"type": OUR_TYPE[t], "inputs": ",".join(inputs)}
        if gpu is not None:
            layer["gpu"] = gpu
        for k, v in items.items():
            if k in known and known[k] is not None:
                layer[known[k]] = v.strip()
        if t in ("conv", "local", "pool"):
            layer["rounding"] = "up"
        if t == "cmrnorm":
            layer.setdefault("k", "1")
            layer["convention"] = "mean"
        if t == "dropout2":
            layer["scaling"] = "test"
        if t == "softmax":
            softmaxes[sec] = layer
        out.append([sec, layer])
        if neuron:
            if _neuron(neuron, where) is not None:
                name = f"{sec}_neuron"
                while name in sections:
                    name += "_"
                out.append([name, {"type": "neuron", "inputs": sec, "neuron": neuron,
                                   **({"gpu": gpu} if gpu is not None else {})}])
                neuron_of[sec] = name
    if not any(layer["type"] == "data" for _, layer in out):
        raise CudaConvnetError(f"{source}: no image data layer (type=data, dataIdx=0)")
    return [(sec, layer) for sec, layer in out]


def _neuron(text, where):
    """The neuron ``text`` names (None: the identity); its written form goes into the model text as it is, so its
    parameters keep every digit."""
    try:
        n = neurons.parse(text)
    except ValueError as e:
        raise CudaConvnetError(f"{where} neuron: {e}") from None
    return None if n == neurons.Neuron("linear", 1.0, 0.0) else n  # the identity: no layer


def _enabled(items, where):
    v = items.pop("enable", None)
    if v is None:
        return True
    try:
        return _bool(v)
    except ValueError:
        raise CudaConvnetError(f"{where} enable: expected true/false, got {v.strip()!r}") from None
