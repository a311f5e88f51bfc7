"""Stored responses (`store: true`, the Responses API's default): what `previous_response_id`
continues and `GET /v1/responses/{id}` returns. In this process's memory, least recently used
first out, bounded in number (--responses-store-size) and in size; lost on restart."""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import BaseModel

MAX_STORED_CHARS = 256 << 20  # all stored JSON together: responses, their inputs, the conversations behind them


@dataclass
class Stored:
    response: dict  # the Response object, as it was returned
    input_items: list[dict]  # this request's input, as `input_items` lists it (with ids)
    history: list[BaseModel]  # the conversation's items to the end of this response: what a next one continues

    @property
    def size(self) -> int:
        return (len(json.dumps(self.response)) + len(json.dumps(self.input_items))
                + sum(len(item.model_dump_json()) for item in self.history))


class ResponseStore:
    def __init__(self, max_responses: int, max_chars: int = MAX_STORED_CHARS) -> None:
        self.max_responses, self.max_chars = max_responses, max_chars
        self._entries: OrderedDict[str, tuple[Stored, int]] = OrderedDict()
        self.chars = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, entry: Stored) -> None:
        size = entry.size
        if self.max_responses == 0 or size > self.max_chars:
            return  # nothing can be kept (a later lookup is a 404, as for one evicted)
        self.delete(response_id)
        self._entries[response_id] = (entry, size)
        self.chars += size
        while len(self._entries) > self.max_responses or self.chars > self.max_chars:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.chars -= evicted

    def get(self, response_id: str) -> Stored | None:
        found = self._entries.get(response_id)
        if found is None:
            return None
        self._entries.move_to_end(response_id)
        return found[0]

    def delete(self, response_id: str) -> bool:
        found = self._entries.pop(response_id, None)
        if found is not None:
            self.chars -= found[1]
        return found is not None
