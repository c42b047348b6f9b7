"""The small furniture workshop both simulators start with.

Katana's simulator seeds these materials and products (with recipes and operations, so a
finished manufacturing order has a real cost); the demo orders them from TradeGecko.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

__all__ = ["MATERIALS", "PRODUCTS", "Material", "Operation", "Product", "RecipeRow"]


@dataclass(frozen=True)
class Material:
    sku: str
    name: str
    purchase_price: Decimal


@dataclass(frozen=True)
class RecipeRow:
    sku: str
    quantity: Decimal


@dataclass(frozen=True)
class Operation:
    name: str
    hours: Decimal
    cost_per_hour: Decimal


@dataclass(frozen=True)
class Product:
    sku: str
    name: str
    sales_price: Decimal
    recipe: tuple[RecipeRow, ...] = field(default_factory=tuple)
    operations: tuple[Operation, ...] = field(default_factory=tuple)


MATERIALS: tuple[Material, ...] = (
    Material("MAT-OAK-BOARD", "Oak board", Decimal("12.50")),
    Material("MAT-PINE-BOARD", "Pine board", Decimal("4.20")),
    Material("MAT-SCREW", "Wood screw", Decimal("0.05")),
    Material("MAT-VARNISH", "Varnish (100 ml)", Decimal("1.80")),
    Material("MAT-BRASS-ROD", "Brass rod", Decimal("7.35")),
)

PRODUCTS: tuple[Product, ...] = (
    Product(
        "CHAIR-OAK",
        "Oak chair",
        Decimal("180.00"),
        (
            RecipeRow("MAT-OAK-BOARD", Decimal("3")),
            RecipeRow("MAT-SCREW", Decimal("16")),
            RecipeRow("MAT-VARNISH", Decimal("2")),
        ),
        (Operation("Assembly", Decimal("1.5"), Decimal("24.00")),),
    ),
    Product(
        "TABLE-OAK",
        "Oak table",
        Decimal("640.00"),
        (
            RecipeRow("MAT-OAK-BOARD", Decimal("9")),
            RecipeRow("MAT-SCREW", Decimal("32")),
            RecipeRow("MAT-VARNISH", Decimal("5")),
        ),
        (
            Operation("Cutting", Decimal("2"), Decimal("30.00")),
            Operation("Assembly", Decimal("3"), Decimal("24.00")),
        ),
    ),
    Product(
        "STOOL-PINE",
        "Pine stool",
        Decimal("45.00"),
        (RecipeRow("MAT-PINE-BOARD", Decimal("2")), RecipeRow("MAT-SCREW", Decimal("8"))),
        (Operation("Assembly", Decimal("0.5"), Decimal("24.00")),),
    ),
    Product(
        "LAMP-BRASS",
        "Brass lamp",
        Decimal("95.00"),
        (RecipeRow("MAT-BRASS-ROD", Decimal("2")), RecipeRow("MAT-SCREW", Decimal("4"))),
        (Operation("Soldering", Decimal("0.75"), Decimal("28.00")),),
    ),
)
