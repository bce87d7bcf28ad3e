"""Runs and measurements.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("dataset", sa.String(200), nullable=False),
        sa.Column("git_sha", sa.String(64), nullable=True),
        sa.Column("git_branch", sa.String(200), nullable=True),
        sa.Column("package_versions", sa.JSON, nullable=False),
        sa.Column("config_hash", sa.String(128), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index("ix_runs_dataset_git_branch_status_started_at", "runs",
                    ["dataset", "git_branch", "status", "started_at"])
    op.create_index("ix_runs_status_started_at", "runs", ["status", "started_at"])
    op.create_table(
        "measurements",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.BigInteger, nullable=False),
        sa.Column("metric", sa.String(200), nullable=False),
        sa.Column("value", sa.Double, nullable=True),
        sa.Column("unit", sa.String(64), nullable=False),
        sa.Column("uncertainty", sa.Double, nullable=True),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_measurements"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE",
                                name="fk_measurements_run_id_runs"),
    )
    op.create_index("ix_measurements_run_id_metric", "measurements", ["run_id", "metric"])


def downgrade() -> None:
    op.drop_table("measurements")
    op.drop_table("runs")
