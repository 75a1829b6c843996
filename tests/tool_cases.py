"""30 varied tool sets with a request that calls for one of them (tests and benchmarks/bench_tools.py).

Each case: (tools, user message, the function the request is about). The schemas cover nested
objects, enums, arrays of objects, optional fields, integer and number bounds, booleans,
nullable fields, anyOf, $defs/$ref, string formats and patterns, Chinese text, and sets of
several tools at once.
"""

from __future__ import annotations

from typing import Any


def fn(name: str, description: str, properties: dict[str, Any], required: list[str] | None = None,
       **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"type": "object", "properties": properties, **extra}
    if required:
        params["required"] = required
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


S = {"type": "string"}
I = {"type": "integer"}
N = {"type": "number"}
B = {"type": "boolean"}

WEATHER = fn("get_weather", "Get the current weather in a city",
             {"city": S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"])
SEARCH = fn("search_web", "Search the web for a query", {"query": S, "max_results": {**I, "minimum": 1, "maximum": 20}},
            ["query"])
EMAIL = fn("send_email", "Send an email", {"to": {"type": "array", "items": {"type": "string", "format": "email"},
                                                  "minItems": 1},
                                           "subject": S, "body": S, "cc": {"type": "array", "items": S}},
           ["to", "subject", "body"])
CALC = fn("calculate", "Evaluate an arithmetic expression", {"expression": S}, ["expression"])
TIMER = fn("set_timer", "Set a timer", {"minutes": {**I, "minimum": 1, "maximum": 600}, "label": S}, ["minutes"])

CASES: list[tuple[list[dict[str, Any]], str, str]] = [
    ([WEATHER], "What's the weather like in Paris?", "get_weather"),
    ([SEARCH], "Search the web for the latest Rust release notes.", "search_web"),
    ([EMAIL], "Email bob@example.com with subject 'Lunch' saying I'll be late.", "send_email"),
    ([CALC], "What is 1234 * 5678? Use the calculator.", "calculate"),
    ([TIMER], "Set a 10 minute timer for the pasta.", "set_timer"),
    ([WEATHER, SEARCH, CALC], "How warm is it in Tokyo right now?", "get_weather"),
    ([WEATHER, SEARCH, CALC], "Compute 2 to the power of 16.", "calculate"),
    ([EMAIL, TIMER, SEARCH], "Remind me in 25 minutes to stretch.", "set_timer"),
    ([fn("create_event", "Create a calendar event",
         {"title": S, "date": {"type": "string", "format": "date"},
          "start_time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
          "attendees": {"type": "array", "items": {"type": "object", "properties": {"name": S, "email": S},
                                                   "required": ["name"]}}}, ["title", "date"])],
     "Schedule a meeting called Design Review on 2025-03-14 at 15:00 with Ann.", "create_event"),
    ([fn("book_flight", "Book a flight",
         {"from": S, "to": S, "passengers": {**I, "minimum": 1, "maximum": 9},
          "class": {"type": "string", "enum": ["economy", "premium", "business", "first"]},
          "return_trip": B}, ["from", "to", "passengers"])],
     "Book a business class flight from Berlin to Lisbon for 2 people.", "book_flight"),
    ([fn("add_to_cart", "Add products to the shopping cart",
         {"items": {"type": "array", "minItems": 1,
                    "items": {"type": "object", "properties": {"sku": S, "quantity": {**I, "minimum": 1}},
                              "required": ["sku", "quantity"], "additionalProperties": False}}},
         ["items"])],
     "Put 3 of SKU A-100 and 1 of SKU B-200 in my cart.", "add_to_cart"),
    ([fn("update_user", "Update a user profile",
         {"user_id": I, "profile": {"type": "object", "properties": {
             "display_name": S, "age": {**I, "minimum": 0, "maximum": 150},
             "address": {"type": "object", "properties": {"street": S, "city": S, "zip": S}, "required": ["city"]}}}},
         ["user_id", "profile"])],
     "Change user 42's display name to Kim and their city to Oslo.", "update_user"),
    ([fn("convert_currency", "Convert an amount between currencies",
         {"amount": {**N, "minimum": 0}, "from_currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
          "to_currency": {"type": "string", "pattern": "^[A-Z]{3}$"}}, ["amount", "from_currency", "to_currency"])],
     "How much is 250 US dollars in euros?", "convert_currency"),
    ([fn("get_stock_price", "Latest price of a stock", {"ticker": {"type": "string", "maxLength": 6}}, ["ticker"]),
      WEATHER, SEARCH],
     "What's Apple's stock price?", "get_stock_price"),
    ([fn("translate", "Translate text", {"text": S, "target_language": {"type": "string",
                                                                       "enum": ["en", "zh", "fr", "de", "es", "ja"]}},
         ["text", "target_language"])],
     "Translate 'good morning' into Chinese.", "translate"),
    ([fn("查询天气", "查询城市天气", {"城市": S, "日期": {"type": "string", "format": "date"}}, ["城市"])],
     "北京明天天气怎么样？", "查询天气"),
    ([fn("run_sql", "Run a read-only SQL query", {"query": S, "limit": {**I, "minimum": 1, "maximum": 1000},
                                                   "explain": B}, ["query"])],
     "Count the rows in the orders table.", "run_sql"),
    ([fn("resize_image", "Resize an image",
         {"path": S, "width": {**I, "minimum": 1}, "height": {**I, "minimum": 1},
          "keep_aspect": {"type": "boolean"}, "format": {"type": "string", "enum": ["png", "jpeg", "webp"]}},
         ["path", "width"])],
     "Resize photo.jpg to 800 pixels wide as webp.", "resize_image"),
    ([fn("create_ticket", "Open a support ticket",
         {"title": S, "priority": {"type": "string", "enum": ["low", "medium", "high", "urgent"]},
          "tags": {"type": "array", "items": S, "maxItems": 5}, "assignee": {"type": ["string", "null"]}},
         ["title", "priority"])],
     "Open an urgent ticket: the login page is down.", "create_ticket"),
    ([fn("set_thermostat", "Set the thermostat", {"temperature": {**N, "minimum": 10, "maximum": 30},
                                                  "mode": {"type": "string", "enum": ["heat", "cool", "auto"]}},
         ["temperature"])],
     "Set the heating to 21.5 degrees.", "set_thermostat"),
    ([fn("geocode", "Coordinates of a place", {"place": S}, ["place"]),
      fn("route", "Driving route between two coordinates",
         {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}, ["start", "end"],
         **{"$defs": {"point": {"type": "object", "properties": {"lat": N, "lon": N}, "required": ["lat", "lon"]}}})],
     "Find the coordinates of the Eiffel Tower.", "geocode"),
    ([fn("route", "Driving route between two coordinates",
         {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}, ["start", "end"],
         **{"$defs": {"point": {"type": "object", "properties": {"lat": N, "lon": N}, "required": ["lat", "lon"]}}})],
     "Route me from (48.85, 2.35) to (48.86, 2.29).", "route"),
    ([fn("play_music", "Play music", {"query": S, "shuffle": B, "volume": {**I, "minimum": 0, "maximum": 100}})],
     "Play some jazz at volume 30.", "play_music"),
    ([fn("lookup_order", "Look up an order", {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4,8}$"}},
         ["order_id"]),
      fn("cancel_order", "Cancel an order", {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4,8}$"},
                                             "reason": S}, ["order_id"])],
     "Cancel order ORD-123456, I ordered the wrong size.", "cancel_order"),
    ([fn("log_workout", "Log a workout",
         {"activity": {"type": "string", "enum": ["run", "swim", "bike", "lift"]},
          "duration_min": {**I, "minimum": 1}, "distance_km": {"anyOf": [N, {"type": "null"}]},
          "notes": S}, ["activity", "duration_min"])],
     "I ran 5 km in 28 minutes.", "log_workout"),
    ([fn("get_time", "Current time in a time zone", {"timezone": S}, ["timezone"]), WEATHER, TIMER, CALC, SEARCH],
     "What time is it in Sydney?", "get_time"),
    ([fn("create_invoice", "Create an invoice",
         {"customer": {"type": "object", "properties": {"name": S, "email": {"type": "string", "format": "email"}},
                       "required": ["name"]},
          "lines": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
              "description": S, "amount": {**N, "minimum": 0}}, "required": ["description", "amount"]}},
          "currency": {"type": "string", "enum": ["USD", "EUR", "GBP"]}}, ["customer", "lines"])],
     "Invoice ACME Corp 1200 EUR for consulting.", "create_invoice"),
    ([fn("read_file", "Read a file", {"path": S, "encoding": {"type": "string", "enum": ["utf-8", "latin-1"]}},
         ["path"]),
      fn("write_file", "Write a file", {"path": S, "content": S, "append": B}, ["path", "content"])],
     "Write 'hello' to notes.txt.", "write_file"),
    ([fn("rate_movie", "Rate a movie", {"title": S, "stars": {**I, "minimum": 1, "maximum": 5}, "review": S},
         ["title", "stars"])],
     "Give Inception 5 stars.", "rate_movie"),
    ([fn("no_args_ping", "Check that the service is up", {})],
     "Is the service up? Ping it.", "no_args_ping"),
]

assert len(CASES) == 30
