"""
The compiled fast validator and jsonschema agree on what is valid.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from hero_compute.rpc.schema import load_schema

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
resources = (
    st.fixed_dictionaries(
        {
            "vcpus": st.integers(-2, 64),
            "memory_mb": st.integers(-2, 10**6),
            "disk_gb": st.integers(-2, 10**4),
        }
    )
    | json_values
)
heartbeat = st.fixed_dictionaries(
    {
        "node_id": st.text(max_size=130) | json_values,
        "socket_path": st.text(max_size=20) | json_values,
    },
    optional={
        "name": st.text(max_size=10) | json_values,
        "capacity": resources,
        "usage": resources,
        "vm_count": st.integers(-3, 10) | json_values,
        "labels": st.dictionaries(
            st.text(max_size=5), st.text(max_size=5) | json_values, max_size=3
        ),
        "bogus": json_values,
    },
)

SCHEMAS = {"explorer": load_schema("explorer"), "node": load_schema("node")}


def verdicts(method, params):
    """(fast validator says valid, jsonschema says valid)."""
    try:
        method._fast(params)
        fast = True
    except Exception:
        fast = False
    return fast, method._validator.is_valid(params)


@settings(max_examples=300, deadline=None)
@given(params=heartbeat)
def test_heartbeat_validators_agree(params):
    """For heartbeat-shaped params, both validators give the same verdict."""
    fast, reference = verdicts(SCHEMAS["explorer"].methods["explorer.heartbeat"], params)
    assert fast == reference


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(SCHEMAS["node"].methods)),
    params=st.dictionaries(
        st.sampled_from(
            ["name", "vcpus", "memory_mb", "disk_gb", "image", "vm_id", "force", "x"]
        ),
        json_values | st.integers(-5, 70000),
        max_size=6,
    ),
)
def test_node_validators_agree(name, params):
    """For arbitrary params of every node method, both validators agree."""
    fast, reference = verdicts(SCHEMAS["node"].methods[name], params)
    assert fast == reference
