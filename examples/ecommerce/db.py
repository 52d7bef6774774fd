"""The shop's database: SQLite (one file, WAL), seeded deterministically on first start.

Every call runs in a worker thread (SQLite is blocking) on that thread's own connection.
Several application processes may share the file: writes that must not interleave (the
seed, an order's stock check and decrement) run in ``BEGIN IMMEDIATE`` transactions,
which take SQLite's write lock before the first read, so two orders can never both see
the last unit in stock.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "CATEGORIES",
    "USERS",
    "Database",
    "NotFound",
    "OutOfStock",
    "ProductQuery",
    "hash_password",
]

_T = TypeVar("_T")

CATEGORIES: dict[str, tuple[str, ...]] = {
    "laptops": ("Ultrabook", "Workstation", "Chromebook", "Gaming Laptop", "Convertible"),
    "phones": ("Smartphone", "Rugged Phone", "Flip Phone", "Phablet"),
    "audio": ("Headphones", "Earbuds", "Soundbar", "Speaker", "Turntable"),
    "cameras": ("Mirrorless Camera", "Action Camera", "Lens", "Tripod", "Drone"),
    "home": ("Coffee Maker", "Air Purifier", "Robot Vacuum", "Smart Lamp", "Kettle"),
    "outdoor": ("Tent", "Backpack", "Sleeping Bag", "Headlamp", "Water Filter"),
    "books": ("Cookbook", "Novel", "Field Guide", "Atlas", "Biography"),
    "games": ("Board Game", "Puzzle", "Console", "Controller", "Card Game"),
}
BRANDS = ("Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay")
ADJECTIVES = ("Compact", "Pro", "Classic", "Lite", "Max", "Eco", "Plus", "Mini", "Ultra", "Neo")

# The demo's users and their passwords (this is an example: real services never ship these).
USERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "alice": ("wonderland", ()),
    "bob": ("builder", ()),
    "carol": ("christmas", ()),
    "admin": ("admin-secret", ("admin",)),
}
SEEDED_CUSTOMERS = 20  # customer001 ... customer020, password "password-<n>"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    id INTEGER PRIMARY KEY,
    sku TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    category TEXT NOT NULL,
    brand TEXT NOT NULL,
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    stock INTEGER NOT NULL CHECK (stock >= 0),
    description TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS products_category_price ON products (category, price_cents);
CREATE INDEX IF NOT EXISTS products_brand ON products (brand);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    roles TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,  -- the token's subject: ours, or an external issuer's
    status TEXT NOT NULL,
    total_cents INTEGER NOT NULL,
    payment_id TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_user ON orders (user_id);
CREATE TABLE IF NOT EXISTS order_items (
    order_id INTEGER NOT NULL REFERENCES orders (id),
    product_id INTEGER NOT NULL REFERENCES products (id),
    quantity INTEGER NOT NULL CHECK (quantity > 0),
    price_cents INTEGER NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
"""

_PRODUCT_COLUMNS = "id, sku, name, category, brand, price_cents, stock, description"


class NotFound(LookupError):
    """No row with that id."""


class OutOfStock(Exception):
    """An order asks for more units than are left."""

    def __init__(self, product_id: int, wanted: int, left: int) -> None:
        super().__init__(f"product {product_id}: {wanted} wanted, {left} left")
        self.product_id = product_id
        self.wanted = wanted
        self.left = left


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Return ``scrypt$<salt hex>$<hash hex>`` for *password* (scrypt, n=2**14, r=8, p=1)."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << 14, r=8, p=1, dklen=32)
    return f"scrypt${salt.hex()}${digest.hex()}"


def _check_password(password: str, stored: str) -> bool:
    try:
        scheme, salt, expected = stored.split("$")
        digest = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=1 << 14, r=8, p=1, dklen=32
        )
    except ValueError:
        return False
    return scheme == "scrypt" and hmac.compare_digest(digest.hex(), expected)


@dataclass(frozen=True, slots=True)
class ProductQuery:
    """A validated catalog search: filters, text, and one page of the results."""

    category: str | None = None
    brand: str | None = None
    min_price_cents: int | None = None
    max_price_cents: int | None = None
    text: str | None = None
    page: int = 1
    per_page: int = 20

    MAX_PER_PAGE = 100

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> ProductQuery:
        """Parse query parameters; raise ``ValueError`` with a message a client can act on."""
        known = {"category", "brand", "min_price", "max_price", "q", "page", "per_page"}
        unknown = sorted(set(params) - known)
        if unknown:
            msg = f"unknown query parameters: {', '.join(unknown)}"
            raise ValueError(msg)

        def integer(name: str, low: int, high: int) -> int | None:
            raw = params.get(name)
            if raw is None or raw == "":
                return None
            if not raw.isdigit() or not low <= int(raw) <= high:
                msg = f"{name} must be an integer between {low} and {high}, not {raw[:20]!r}"
                raise ValueError(msg)
            return int(raw)

        category = params.get("category") or None
        if category is not None and category not in CATEGORIES:
            msg = f"category must be one of {', '.join(sorted(CATEGORIES))}"
            raise ValueError(msg)
        text = (params.get("q") or "").strip() or None
        if text is not None and len(text) > 100:
            msg = "q must be at most 100 characters"
            raise ValueError(msg)
        brand = params.get("brand") or None
        if brand is not None and len(brand) > 50:
            msg = "brand must be at most 50 characters"
            raise ValueError(msg)
        query = cls(
            category=category,
            brand=brand,
            min_price_cents=integer("min_price", 0, 10**9),
            max_price_cents=integer("max_price", 0, 10**9),
            text=text,
            page=integer("page", 1, 10_000) or 1,
            per_page=integer("per_page", 1, cls.MAX_PER_PAGE) or 20,
        )
        if (
            query.min_price_cents is not None
            and query.max_price_cents is not None
            and query.min_price_cents > query.max_price_cents
        ):
            msg = "min_price must not exceed max_price"
            raise ValueError(msg)
        return query

    def cache_key(self) -> str:
        """A stable key for this query: equal queries share one cache entry."""
        fields = [
            self.category,
            self.brand,
            self.min_price_cents,
            self.max_price_cents,
            self.text,
            self.page,
            self.per_page,
        ]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]


def _product(row: Sequence[Any]) -> dict[str, Any]:
    keys = ("id", "sku", "name", "category", "brand", "price_cents", "stock", "description")
    return dict(zip(keys, row, strict=True))


class Database:
    """The shop's tables, reached from async code through worker threads."""

    def __init__(self, path: Path, *, products: int = 5000, seed: int = 7) -> None:
        self.path = Path(path)
        self.products = products
        self.seed = seed
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # -- plumbing -----------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    @contextmanager
    def _transaction(self, mode: str = "DEFERRED") -> Iterator[sqlite3.Connection]:
        connection = self._connection()
        connection.execute(f"BEGIN {mode}")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.to_thread(function, *args)

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    # -- schema and seed ----------------------------------------------------------------

    def prepare(self) -> None:
        """Create the tables and seed them, once, whichever process gets there first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = self._connection()
        connection.executescript(_SCHEMA)
        with self._transaction("IMMEDIATE") as db:
            (count,) = db.execute("SELECT count(*) FROM users").fetchone()
            if count == 0:
                self._seed(db)

    def _seed(self, db: sqlite3.Connection) -> None:
        rng = random.Random(self.seed)
        now = time.time()
        rows = []
        for number in range(1, self.products + 1):
            category = rng.choice(sorted(CATEGORIES))
            kind = rng.choice(CATEGORIES[category])
            brand = rng.choice(BRANDS)
            name = f"{brand} {rng.choice(ADJECTIVES)} {kind} {rng.randint(100, 999)}"
            price = rng.randint(5, 2500) * 100 - rng.choice((0, 1, 5, 51))
            description = f"A {kind.lower()} by {brand}, model {number}."
            rows.append(
                (number, f"SKU-{number:06d}", name, category, brand, price,
                 rng.randint(0, 50), description, now)
            )  # fmt: skip
        db.executemany(
            f"INSERT INTO products ({_PRODUCT_COLUMNS}, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            rows,
        )
        users = [(name, password, roles) for name, (password, roles) in USERS.items()]
        users += [(f"customer{n:03d}", f"password-{n}", ()) for n in range(1, SEEDED_CUSTOMERS + 1)]
        # Salts from the seeded generator keep the file reproducible byte for byte.
        db.executemany(
            "INSERT INTO users (username, password_hash, roles) VALUES (?, ?, ?)",
            [
                (name, hash_password(password, salt=rng.randbytes(16)), json.dumps(list(roles)))
                for name, password, roles in users
            ],
        )

    # -- users --------------------------------------------------------------------------

    def _authenticate(self, username: str, password: str) -> dict[str, Any] | None:
        row = (
            self._connection()
            .execute("SELECT id, password_hash, roles FROM users WHERE username = ?", (username,))
            .fetchone()
        )
        # An unknown user costs the same scrypt as a known one: no timing oracle.
        stored = row[1] if row else _UNKNOWN_USER_HASH
        if not _check_password(password, stored) or row is None:
            return None
        return {"id": row[0], "username": username, "roles": json.loads(row[2])}

    async def authenticate(self, username: str, password: str) -> dict[str, Any] | None:
        """Return the user if *password* is theirs, else ``None``."""
        return await self._run(self._authenticate, username, password)

    # -- catalog ------------------------------------------------------------------------

    def _search(self, query: ProductQuery) -> dict[str, Any]:
        where: list[str] = []
        args: list[object] = []
        if query.category is not None:
            where.append("category = ?")
            args.append(query.category)
        if query.brand is not None:
            where.append("brand = ?")
            args.append(query.brand)
        if query.min_price_cents is not None:
            where.append("price_cents >= ?")
            args.append(query.min_price_cents)
        if query.max_price_cents is not None:
            where.append("price_cents <= ?")
            args.append(query.max_price_cents)
        if query.text is not None:
            escaped = query.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append("(name LIKE ? ESCAPE '\\' OR description LIKE ? ESCAPE '\\')")
            args += [f"%{escaped}%"] * 2
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        db = self._connection()
        (total,) = db.execute(f"SELECT count(*) FROM products {clause}", args).fetchone()
        rows = db.execute(
            f"SELECT {_PRODUCT_COLUMNS} FROM products {clause} ORDER BY id LIMIT ? OFFSET ?",
            [*args, query.per_page, (query.page - 1) * query.per_page],
        ).fetchall()
        return {
            "items": [_product(row) for row in rows],
            "page": query.page,
            "per_page": query.per_page,
            "total": total,
        }

    async def search(self, query: ProductQuery) -> dict[str, Any]:
        """One page of the products matching *query*, and how many match in all."""
        return await self._run(self._search, query)

    def _product(self, product_id: int) -> dict[str, Any] | None:
        row = (
            self._connection()
            .execute(f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE id = ?", (product_id,))
            .fetchone()
        )
        return None if row is None else _product(row)

    async def product(self, product_id: int) -> dict[str, Any] | None:
        """The product with *product_id*, or ``None``."""
        return await self._run(self._product, product_id)

    def _update_product(self, product_id: int, changes: Mapping[str, Any]) -> dict[str, Any]:
        columns = sorted(changes)  # validated by the caller against UPDATABLE
        assert set(columns) <= UPDATABLE
        with self._transaction("IMMEDIATE") as db:
            assignments = ", ".join(f"{column} = ?" for column in columns)
            cursor = db.execute(
                f"UPDATE products SET {assignments}, updated_at = ? WHERE id = ?",
                [*(changes[c] for c in columns), time.time(), product_id],
            )
            if cursor.rowcount == 0:
                raise NotFound(product_id)
            row = db.execute(
                f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE id = ?",
                (product_id,),
            ).fetchone()
        return _product(row)

    async def update_product(self, product_id: int, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Apply *changes* (columns of :data:`UPDATABLE`) and return the product."""
        return await self._run(self._update_product, product_id, changes)

    # -- orders -------------------------------------------------------------------------

    def _reserve(self, user_id: str, items: Mapping[int, int]) -> dict[str, Any]:
        with self._transaction("IMMEDIATE") as db:
            total = 0
            lines = []
            for product_id, quantity in sorted(items.items()):
                row = db.execute(
                    "SELECT stock, price_cents FROM products WHERE id = ?", (product_id,)
                ).fetchone()
                if row is None:
                    raise NotFound(product_id)
                stock, price = row
                if stock < quantity:
                    raise OutOfStock(product_id, quantity, stock)
                db.execute(
                    "UPDATE products SET stock = stock - ? WHERE id = ?", (quantity, product_id)
                )
                total += price * quantity
                lines.append((product_id, quantity, price))
            cursor = db.execute(
                "INSERT INTO orders (user_id, status, total_cents, created_at) "
                "VALUES (?, 'pending', ?, ?)",
                (user_id, total, time.time()),
            )
            order_id = cursor.lastrowid
            db.executemany(
                "INSERT INTO order_items (order_id, product_id, quantity, price_cents) "
                "VALUES (?, ?, ?, ?)",
                [(order_id, *line) for line in lines],
            )
        return {
            "id": order_id,
            "user_id": user_id,
            "status": "pending",
            "total_cents": total,
            "items": [{"product_id": p, "quantity": q, "price_cents": c} for p, q, c in lines],
        }

    async def reserve(self, user_id: str, items: Mapping[int, int]) -> dict[str, Any]:
        """Take the stock of *items* (product id -> quantity) and record a pending order.

        All or nothing: raises :class:`OutOfStock` or :class:`NotFound` and changes nothing
        when one line cannot be served.
        """
        return await self._run(self._reserve, user_id, items)

    def _settle(self, order_id: int, payment_id: str | None) -> None:
        with self._transaction("IMMEDIATE") as db:
            if payment_id is not None:
                db.execute(
                    "UPDATE orders SET status = 'paid', payment_id = ? WHERE id = ?",
                    (payment_id, order_id),
                )
                return
            # Payment failed: give the stock back and keep the order as a record.
            for product_id, quantity in db.execute(
                "SELECT product_id, quantity FROM order_items WHERE order_id = ?", (order_id,)
            ).fetchall():
                db.execute(
                    "UPDATE products SET stock = stock + ? WHERE id = ?", (quantity, product_id)
                )
            db.execute("UPDATE orders SET status = 'cancelled' WHERE id = ?", (order_id,))

    async def mark_paid(self, order_id: int, payment_id: str) -> None:
        """Record the payment of a pending order."""
        await self._run(self._settle, order_id, payment_id)

    async def cancel(self, order_id: int) -> None:
        """Cancel a pending order and put its stock back."""
        await self._run(self._settle, order_id, None)

    def _orders_where(self, condition: str, value: object) -> list[dict[str, Any]]:
        db = self._connection()
        orders = db.execute(
            "SELECT id, user_id, status, total_cents, payment_id, created_at FROM orders "
            f"WHERE {condition} = ? ORDER BY id",  # condition: a column name of ours
            (value,),
        ).fetchall()
        result = []
        for order_id, user_id, status, total, payment_id, created_at in orders:
            items = db.execute(
                "SELECT product_id, quantity, price_cents FROM order_items WHERE order_id = ? "
                "ORDER BY product_id",
                (order_id,),
            ).fetchall()
            result.append(
                {
                    "id": order_id,
                    "user_id": user_id,
                    "status": status,
                    "total_cents": total,
                    "payment_id": payment_id,
                    "created_at": created_at,
                    "items": [
                        {"product_id": p, "quantity": q, "price_cents": c} for p, q, c in items
                    ],
                }
            )
        return result

    async def orders_of(self, user_id: str) -> list[dict[str, Any]]:
        """Every order of *user_id*, oldest first."""
        return await self._run(self._orders_where, "user_id", user_id)

    async def order(self, order_id: int) -> dict[str, Any] | None:
        """The order *order_id*, or ``None`` if there is none."""
        found = await self._run(self._orders_where, "id", order_id)
        return found[0] if found else None

    async def ping(self) -> None:
        """Raise if the database cannot answer a query."""
        await self._run(lambda: self._connection().execute("SELECT 1").fetchone())


UPDATABLE = frozenset({"name", "price_cents", "stock", "description"})
_UNKNOWN_USER_HASH = hash_password("no such user", salt=b"\x00" * 16)
