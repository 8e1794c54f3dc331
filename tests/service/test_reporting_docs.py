"""Every SQL example in docs/reporting.md runs on PostgreSQL against the reporting dataset."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from report_data import Dataset, build

pytestmark = pytest.mark.services
DOC = Path(__file__).resolve().parents[2] / "docs" / "reporting.md"
QUERIES = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_ten_or_more_examples() -> None:
    assert len(QUERIES) >= 10


@pytest.mark.parametrize("sql", QUERIES, ids=[f"q{i}" for i in range(len(QUERIES))])
def test_example_query_runs(pg_url: str, sql: str) -> None:
    ds: Dataset = build(pg_url)
    with sa.create_engine(ds.url).connect() as conn:
        result = conn.execute(sa.text(sql.strip().rstrip(";")))
        assert result.keys()  # columns came back
        result.all()
