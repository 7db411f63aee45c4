"""`llmos users add | list | remove`: the users of this llmos home and their API keys."""

from __future__ import annotations

from typing import Annotated

import typer

from llmos.commands._common import console, fail

users_app = typer.Typer(no_args_is_help=True, help="Users and their API keys (keys are stored hashed).")


def _store():
    from llmos.home import llmos_home
    from llmos.kernel.users import UserStore

    return UserStore.of_home(llmos_home())


@users_app.command("add")
def add(name: Annotated[str, typer.Argument(help="The user's name.")],
        admin: Annotated[bool, typer.Option(help="May see and manage every user's objects.")] = False,
        ) -> None:
    """Add a user and print their API key (shown this once; only its hash is kept).

    Example: llmos users add alice
    """
    from llmos.kernel.users import UserError

    try:
        user, key = _store().add(name, admin=admin)
    except UserError as e:
        fail(str(e))
    console.print(f"added {'admin ' if admin else ''}user [bold]{user.name}[/] ({user.id}); API key:")
    print(key)
    console.print("[dim]Keep it: it is not shown again. Clients send it as 'Authorization: Bearer KEY'.[/]")


@users_app.command("list")
def list_users() -> None:
    """List the users (never their keys).

    Example: llmos users list
    """
    from rich.table import Table

    users = _store().list()
    if not users:
        console.print("[dim]no users: the server runs as the single local user (llmos users add NAME)[/]")
        return
    table = Table("name", "id", "admin")
    for u in users:
        table.add_row(u.name, u.id, "yes" if u.admin else "")
    console.print(table)


@users_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="The user's name.")]) -> None:
    """Remove a user; their keys stop working at once (their objects stay, owned by their old id).

    Example: llmos users remove alice
    """
    from llmos.kernel.users import UserError

    try:
        user = _store().remove(name)
    except UserError as e:
        fail(str(e))
    console.print(f"removed {user.name} ({user.id})")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.add_typer(users_app, name="users")
