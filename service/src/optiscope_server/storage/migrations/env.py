"""Alembic's environment: migrations run on the connection the collector (or ``optiscope db``)
hands over, inside its transaction, so an upgrade is all or nothing where the database allows."""

from alembic import context

from optiscope_server.storage.tables import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite"
)  # SQLite alters tables by copying them
with context.begin_transaction():
    context.run_migrations()
