from django.test import TestCase

from .models import Note


class NotesTests(TestCase):
    def test_index_page(self):
        resp = self.client.get("/", HTTP_HOST="notes.localhost")
        self.assertEqual(resp.status_code, 200)
        self.assertContains(resp, "slipway notes")
        self.assertContains(resp, '<span id="count">0</span>')

    def test_add_creates_note(self):
        resp = self.client.post("/add", {"text": "hello"}, HTTP_HOST="notes.localhost")
        self.assertEqual(resp.status_code, 302)
        self.assertEqual(resp["Location"], "/")
        self.assertEqual(Note.objects.count(), 1)
        self.assertEqual(Note.objects.get().text, "hello")
        resp = self.client.get("/", HTTP_HOST="notes.localhost")
        self.assertContains(resp, '<span id="count">1</span>')
        self.assertContains(resp, "hello")

    def test_health(self):
        resp = self.client.get("/health", HTTP_HOST="example.com")
        self.assertEqual(resp.status_code, 200)
        self.assertEqual(resp.content, b"ok")
