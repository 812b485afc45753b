import copy
import inspect
import pickle

import numpy as np
import pytest

import convnet
from convnet.devices import Device, DeviceUnavailable, device_report, get_device, parse_device


def test_device_values_parse_and_print():
    assert get_device("numpy") == Device("numpy")
    assert get_device("emu") == Device("emu", 0)
    assert str(Device("cuda", 1)) == "cuda:1" and str(Device("cuda")) == "cuda:0"
    assert str(Device("emu", 1)) == "emu:1"  # a virtual second device
    assert get_device(Device("numpy")) is not None
    assert len({Device("cuda", 0), Device("cuda", 0), Device("cuda", 1)}) == 2  # hashable values


def test_a_device_is_one_immutable_object_per_kind_and_index():
    d = Device("emu", 1)
    assert d is Device("emu", np.int64(1)) is parse_device("emu:1") and d is not Device("emu", 0)
    assert isinstance(d, Device) and type(d) is not type(Device("numpy", 1))  # each kind is its own class
    assert pickle.loads(pickle.dumps(d)) is d and copy.deepcopy({d: "tower"}) == {d: "tower"}
    with pytest.raises(AttributeError, match="value"):
        d.index = 2


def test_the_cpu_device_replaces_only_the_functions_in_its_table_with_the_references_signatures():
    from convnet.devices.backend_cpu import FAST_FUNCTIONS
    from convnet.reference import tensor

    cpu, numpy = Device("cpu"), Device("numpy")
    for reference, fast in FAST_FUNCTIONS.items():
        # the reference's parameters, then only keyword-only options with defaults (conv_forward's relu)
        ref_params, fast_params = (list(inspect.signature(f).parameters.values()) for f in (reference, fast))
        extra = fast_params[len(ref_params):]
        assert fast.__name__ == reference.__name__ and fast_params[:len(ref_params)] == ref_params
        assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extra), extra
        assert cpu.host_function(reference) is fast and numpy.host_function(reference) is reference
    assert cpu.host_function(tensor.add) is tensor.add


@pytest.mark.parametrize("spec, exc, match", [
    ("tpu", ValueError, "unknown device"), ("cuda:x", ValueError, "bad device"), ("cuda:-1", ValueError, "bad device"),
    (3, TypeError, "device must be"),
])
def test_bad_device_specs(spec, exc, match):
    with pytest.raises(exc, match=match):
        get_device(spec)


def test_report_lists_every_kind_with_a_reason():
    report = device_report()
    kinds = {entry["device"].split(":")[0] for entry in report}
    assert kinds == {"numpy", "cpu", "emu", "cuda"}
    assert all(entry["detail"] for entry in report)
    assert next(e for e in report if e["device"] == "emu")["usable"]


def test_best_device_and_unavailable_cuda():
    usable_gpu = any(e["usable"] for e in device_report() if e["device"].startswith("cuda"))
    assert get_device(None) == (Device("cuda", 0) if usable_gpu else Device("cpu"))
    if not usable_gpu:
        with pytest.raises(DeviceUnavailable, match="not usable"):
            get_device("cuda")
    with pytest.raises(DeviceUnavailable, match="cuda:64 is not usable"):
        get_device("cuda:64")


def test_cuda_module_was_built_by_nvcc():
    """The nvcc-compiled module must import even without a GPU (static runtime)."""
    import importlib
    import os

    try:
        _cuda = importlib.import_module("convnet._cuda")
    except ImportError as exc:
        if os.environ.get("CONVNET_REQUIRE_CUDA_MODULE") == "1":  # set by .ci/run: nvcc is there, so it must exist
            raise AssertionError(f"convnet._cuda was not built: {exc}") from None
        pytest.skip(f"convnet._cuda not built in this tree ({exc})")

    assert _cuda.IS_EMULATOR is False
    count, message = _cuda.device_count()
    assert count >= 0 and (count > 0 or message)
    # Both modules live in one process (the emu kernel tests import _emu first): types they both bind must be
    # module-local, or the second import fails with "already registered".
    _emu = importlib.import_module("convnet._emu")
    assert _cuda.ConvPass is not _emu.ConvPass and _cuda.ConvPass.forward.name == _emu.ConvPass.forward.name
    assert _cuda.CudaError is not _emu.CudaError


def test_arrays_round_trip_on_host_devices():
    for dev in (Device("numpy"), Device("emu")):
        a = dev.asarray([[1, 2], [3, 4]], np.float32)
        assert dev.is_array(a) and a.flags.c_contiguous and dev.to_numpy(a).sum() == 10
        assert dev.zeros((2, 3)).dtype == np.float32
    assert convnet.EmulatorError.__mro__[1] is RuntimeError
