import pytest

from canonflow.errors import RequestRejected
from canonflow.model import TableRef
from canonflow.transform.request import check_manifest_key, check_source_files

T = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")
GOOD = "raw/acme/crm/contacts/job-1/c-0/part-00000.jsonl.zst"


def test_keys_under_the_table_prefix_pass() -> None:
    assert check_source_files(T, [GOOD]) == [GOOD]


@pytest.mark.parametrize("bad", [
    "raw/globex/crm/contacts/job-1/c-0/part-00000.jsonl.zst",   # another tenant
    "raw/acme/crm/contacts/../../../globex/crm/contacts/x",     # climbs out
    "raw/acme/crm/contacts/./x",                                 # not normalized
    "/raw/acme/crm/contacts/x",                                  # absolute
    "raw/acme/crm/contactsX/x",                                  # prefix trick
    "raw/acme/crm/deals/job-1/x",                                # another table
    "raw/acme/crm/contacts/job\n1/x",                            # control character
    "raw/acme/crm/contacts//x",                                  # empty segment
    "raw\\acme\\crm\\contacts\\x",                                # backslashes
    "",
])
def test_anything_else_is_rejected(bad: str) -> None:
    with pytest.raises(RequestRejected):
        check_source_files(T, [GOOD, bad])


def test_non_string_keys_are_rejected() -> None:
    with pytest.raises(RequestRejected, match="not an object key"):
        check_source_files(T, [GOOD, 42])


def test_manifest_must_lie_under_the_tables_manifest_prefix() -> None:
    assert check_manifest_key(T, "manifests/acme/crm/contacts/j.json")
    with pytest.raises(RequestRejected):
        check_manifest_key(T, "manifests/globex/crm/contacts/j.json")
