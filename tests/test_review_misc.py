"""Review: other behaviour the change altered."""
from __future__ import annotations

from activator.config import load_configuration


def test_load_configuration_still_unpacks_as_before(tmp_path):
    """Configuration was a NamedTuple (units, warnings) until this change; a @dataclass does not unpack."""
    unit = tmp_path / "u.toml"
    unit.write_text('[u]\nsocket.listen-stream = "127.0.0.1:8999"\nservice.exec-start = ["true"]\n')
    units, warnings = load_configuration([str(unit)])
    assert [u.name for u in units] == ["u"] and warnings == []
