/* Forwarded(app, proxied): uvicorn's ProxyHeadersMiddleware, only for requests it can change.
 *
 * Why: uvicorn wraps every app in ProxyHeadersMiddleware when proxy headers are on (its
 * default, and ours). That is a coroutine around every request, and on a hello-world
 * request it costs ~6% of the server's instructions (bench/metrics_overhead.py
 * --instructions), even when the request carries no X-Forwarded-* header and nothing is
 * changed. Forwarded looks at the header names in C: a scope with an X-Forwarded-Proto or
 * X-Forwarded-For header (or headers in a shape it does not know) goes to `proxied`,
 * uvicorn's middleware around the app, which decides trust and rewrites the scope exactly
 * as before; any other goes straight to `app`. It adds no frame: it returns what the app
 * it picked returns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

static PyObject *s_headers;

static const char forwarded_proto[] = "x-forwarded-proto"; /* the names uvicorn reads, */
static const char forwarded_for[] = "x-forwarded-for";     /* compared as it does      */

static int
is_name(PyObject *name, const char *text, Py_ssize_t length)
{
    return PyBytes_GET_SIZE(name) == length && memcmp(PyBytes_AS_STRING(name), text, length) == 0;
}

/* 1 if uvicorn's middleware could change this scope, 0 if it could not, -1 on error. A
 * list of (bytes, bytes) tuples, as servers build it, is read here; any other shape is
 * left to the middleware. */
static int
may_be_forwarded(PyObject *scope)
{
    if (!PyDict_CheckExact(scope)) {
        return 1;
    }
    PyObject *headers = PyDict_GetItemWithError(scope, s_headers); /* borrowed */
    if (headers == NULL) {
        return PyErr_Occurred() ? -1 : 0; /* lifespan: no headers, nothing to change */
    }
    if (!PyList_CheckExact(headers)) {
        return 1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        PyObject *header = PyList_GET_ITEM(headers, i);
        if (!PyTuple_CheckExact(header) || PyTuple_GET_SIZE(header) != 2 ||
            !PyBytes_CheckExact(PyTuple_GET_ITEM(header, 0))) {
            return 1;
        }
        PyObject *name = PyTuple_GET_ITEM(header, 0);
        if (is_name(name, forwarded_proto, sizeof(forwarded_proto) - 1) ||
            is_name(name, forwarded_for, sizeof(forwarded_for) - 1)) {
            return 1;
        }
    }
    return 0;
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *app;
    PyObject *proxied;
} ForwardedObject;

static PyObject *
forwarded_vectorcall(ForwardedObject *self, PyObject *const *args, size_t nargsf,
                     PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 3 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "an ASGI app takes (scope, receive, send)");
        return NULL;
    }
    int forwarded = may_be_forwarded(args[0]);
    if (forwarded < 0) {
        return NULL;
    }
    return PyObject_Vectorcall(forwarded ? self->proxied : self->app, args, nargsf, NULL);
}

static PyObject *
forwarded_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"app", "proxied", NULL};
    PyObject *app, *proxied;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:Forwarded", keywords, &app, &proxied)) {
        return NULL;
    }
    ForwardedObject *self = (ForwardedObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)forwarded_vectorcall;
    self->app = Py_NewRef(app);
    self->proxied = Py_NewRef(proxied);
    return (PyObject *)self;
}

static int
forwarded_traverse(ForwardedObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->proxied);
    return 0;
}

static int
forwarded_clear(ForwardedObject *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->proxied);
    return 0;
}

static void
forwarded_dealloc(ForwardedObject *self)
{
    PyObject_GC_UnTrack(self);
    forwarded_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef forwarded_members[] = {
    {"app", T_OBJECT_EX, offsetof(ForwardedObject, app), READONLY, NULL},
    {"proxied", T_OBJECT_EX, offsetof(ForwardedObject, proxied), READONLY, NULL},
    {NULL},
};

static PyTypeObject ForwardedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_supervise._forwarded.Forwarded",
    .tp_doc = "Forwarded(app, proxied): proxied for a scope with X-Forwarded-* headers, "
              "else app.",
    .tp_basicsize = sizeof(ForwardedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(ForwardedObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = forwarded_new,
    .tp_members = forwarded_members,
    .tp_traverse = (traverseproc)forwarded_traverse,
    .tp_clear = (inquiry)forwarded_clear,
    .tp_dealloc = (destructor)forwarded_dealloc,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asgi_supervise._forwarded",
    .m_doc = "uvicorn's proxy-headers middleware, skipped where it could change nothing.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__forwarded(void)
{
    s_headers = PyUnicode_InternFromString("headers");
    if (s_headers == NULL || PyType_Ready(&ForwardedType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "Forwarded", (PyObject *)&ForwardedType) < 0) {
        Py_CLEAR(m);
    }
    return m;
}
