import jax
import pytest

from atoll.parallel.mesh import AXES, MeshError, make_mesh, mesh_sizes, resolve_axis_sizes


def test_minus_one_takes_the_rest():
    assert resolve_axis_sizes({"data": -1, "tensor": 2}, 8) == {
        "island": 1, "data": 4, "fsdp": 1, "expert": 1, "context": 1, "tensor": 2}


def test_mesh_has_every_axis_in_order():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == AXES
    assert mesh_sizes(mesh) == {"island": 1, "data": 2, "fsdp": 2, "expert": 1, "context": 1, "tensor": 2}
    assert mesh.devices.size == jax.device_count() == 8


def test_mesh_that_does_not_match_the_devices_fails_clearly():
    with pytest.raises(MeshError, match=r"needs 6 devices but 8 are available") as e:
        make_mesh({"data": 3, "fsdp": 2})
    assert "product is 8" in str(e.value)
    with pytest.raises(MeshError, match="does not divide 8"):
        make_mesh({"data": -1, "tensor": 3})
    with pytest.raises(MeshError, match="only one mesh axis may be -1"):
        make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(MeshError, match="unknown mesh axes"):
        make_mesh({"pipeline": 8})
    with pytest.raises(MeshError, match="must be positive"):
        make_mesh({"data": 0})


def test_mesh_on_a_subset_of_devices():
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    assert mesh.devices.size == 1
