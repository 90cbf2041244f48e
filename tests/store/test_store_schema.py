"""Arrow schema and tensor <-> Arrow conversion."""

import pyarrow as pa
import pytest
import torch
from store_helpers import TORCH_DTYPES

from lorif_ray.errors import ConfigError
from lorif_ray.store import STORAGE_DTYPES, arrow_schema, arrow_to_tensor, tensor_to_arrow


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_schema_fields(dtype):
    schema = arrow_schema({"u": 3, "v": 5}, dtype)
    assert schema.names == ["example_id", "u", "v"]
    assert schema.field("example_id").type == pa.string() and not schema.field("example_id").nullable
    value_type = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}[dtype]
    for name, width in [("u", 3), ("v", 5)]:
        field = schema.field(name)
        assert pa.types.is_fixed_size_list(field.type) and field.type.list_size == width
        assert field.type.value_type == value_type and not field.nullable
        assert field.metadata == {b"lorif.dtype": dtype.encode()}


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_round_trip_rounds_to_storage_dtype(dtype):
    t = torch.randn(6, 7, dtype=torch.float64)
    arr = tensor_to_arrow(t, dtype)
    assert len(arr) == 6
    back = arrow_to_tensor(arr, dtype)
    assert back.dtype == torch.float32 and back.shape == (6, 7)
    assert torch.equal(back, t.to(TORCH_DTYPES[dtype]).float())
    assert arrow_to_tensor(arr, dtype, out_dtype=torch.float64).dtype == torch.float64


def test_float32_is_zero_copy_and_slices_respect_offset():
    arr = tensor_to_arrow(torch.arange(12, dtype=torch.float32).view(4, 3), "float32")
    back = arrow_to_tensor(arr, "float32")
    assert back.data_ptr() == arr.flatten().buffers()[1].address
    assert torch.equal(arrow_to_tensor(arr.slice(1, 2), "float32"), torch.arange(3.0, 9.0).view(2, 3))


def test_bad_inputs():
    with pytest.raises(ConfigError, match="float64"):
        arrow_schema({"u": 3}, "float64")
    with pytest.raises(ConfigError, match="'u'"):
        arrow_schema({"u": 0}, "float32")
    with pytest.raises(ValueError, match="2-D"):
        tensor_to_arrow(torch.zeros(3), "float32")
    with pytest.raises(ValueError, match="uint16"):
        arrow_to_tensor(tensor_to_arrow(torch.zeros(2, 3), "float32"), "bfloat16")
