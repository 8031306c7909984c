/* Forwarded(app, proxied, resolve): uvicorn's proxy-headers rules, paid once per distinct input.
 *
 * Why: uvicorn wraps every app in ProxyHeadersMiddleware when proxy headers are on (its
 * default, and ours): a coroutine around every request. On a hello-world request that
 * is ~6% of the server's instructions when no X-Forwarded-* header is there, and ~17%
 * with X-Forwarded-For, which it parses and checks against the trusted addresses every
 * time (bench/metrics_overhead.py --instructions).
 *
 * Here the header names are read in C. A request without X-Forwarded-Proto or
 * X-Forwarded-For goes straight to `app`. With them, what uvicorn's middleware does
 * depends only on the scope type, the client's host and those headers, so
 * resolve(type, client, headers) (forwarded.py: uvicorn's middleware, run on just
 * those) says what to set, `scheme` and/or `client`, and the answer is kept for the
 * next request with the same inputs: at most CACHED answers, each for at most
 * MOST_HEADERS headers of at most LONGEST bytes in all. A scope in a shape this does not
 * know goes to `proxied`, uvicorn's middleware around the app, unchanged. No frame is
 * added: it returns what the app returns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

static PyObject *s_headers, *s_type, *s_client, *s_scheme;

#define CACHED 4096     /* answers kept; all dropped when full */
#define MOST_HEADERS 4  /* X-Forwarded-* headers in an answer kept */
#define LONGEST 256     /* bytes of their values, in all, in an answer kept */

enum { PLAIN, FORWARDED, UNKNOWN };

static const char forwarded_proto[] = "x-forwarded-proto"; /* the names uvicorn reads, */
static const char forwarded_for[] = "x-forwarded-for";     /* compared as it does      */

static int
is_name(PyObject *name, const char *text, Py_ssize_t length)
{
    return PyBytes_GET_SIZE(name) == length && memcmp(PyBytes_AS_STRING(name), text, length) == 0;
}

static int
is_forwarding(PyObject *name)
{
    return is_name(name, forwarded_proto, sizeof(forwarded_proto) - 1) ||
           is_name(name, forwarded_for, sizeof(forwarded_for) - 1);
}

/* PLAIN: nothing uvicorn's middleware could change; FORWARDED: a list of (bytes, bytes)
 * with X-Forwarded-* headers, the ones among them in *relevant (a new tuple); UNKNOWN:
 * a shape left to the middleware itself; -1: an error. */
static int
classify(PyObject *scope, PyObject **relevant)
{
    if (!PyDict_CheckExact(scope)) {
        return UNKNOWN;
    }
    PyObject *headers = PyDict_GetItemWithError(scope, s_headers); /* borrowed */
    if (headers == NULL) {
        return PyErr_Occurred() ? -1 : PLAIN; /* lifespan: no headers, nothing to change */
    }
    if (!PyList_CheckExact(headers)) {
        return UNKNOWN;
    }
    Py_ssize_t found = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        PyObject *header = PyList_GET_ITEM(headers, i);
        if (!PyTuple_CheckExact(header) || PyTuple_GET_SIZE(header) != 2 ||
            !PyBytes_CheckExact(PyTuple_GET_ITEM(header, 0)) ||
            !PyBytes_CheckExact(PyTuple_GET_ITEM(header, 1))) {
            return UNKNOWN;
        }
        found += is_forwarding(PyTuple_GET_ITEM(header, 0));
    }
    if (found == 0) {
        return PLAIN;
    }
    *relevant = PyTuple_New(found);
    if (*relevant == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0, at = 0; at < found; i++) {
        PyObject *header = PyList_GET_ITEM(headers, i);
        if (is_forwarding(PyTuple_GET_ITEM(header, 0))) {
            PyTuple_SET_ITEM(*relevant, at++, Py_NewRef(header));
        }
    }
    return FORWARDED;
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *app;
    PyObject *proxied;
    PyObject *resolve;
    PyObject *cache; /* {(type, client host, relevant headers): (scheme, client)} */
} ForwardedObject;

/* Small enough to keep: the client decides these headers, so what is kept is bounded
 * per answer as well as in number. */
static int
keepable(PyObject *relevant)
{
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(relevant); i++) {
        total += PyBytes_GET_SIZE(PyTuple_GET_ITEM(PyTuple_GET_ITEM(relevant, i), 1));
    }
    return PyTuple_GET_SIZE(relevant) <= MOST_HEADERS && total <= LONGEST;
}

/* (scheme, client) for these inputs, each None when uvicorn leaves it: a new reference. */
static PyObject *
answer(ForwardedObject *self, PyObject *type, PyObject *client, PyObject *host,
       PyObject *relevant)
{
    int keep = keepable(relevant);
    PyObject *key = keep ? PyTuple_Pack(3, type, host, relevant) : NULL;
    if (keep && key == NULL) {
        return NULL;
    }
    PyObject *known = key ? PyDict_GetItemWithError(self->cache, key) : NULL; /* borrowed */
    if (known != NULL || PyErr_Occurred()) {
        Py_XDECREF(key);
        return Py_XNewRef(known);
    }
    PyObject *args[3] = {type, client, relevant};
    PyObject *result = PyObject_Vectorcall(self->resolve, args, 3, NULL);
    if (result != NULL && !(PyTuple_CheckExact(result) && PyTuple_GET_SIZE(result) == 2)) {
        PyErr_SetString(PyExc_TypeError, "resolve() must return (scheme, client)");
        Py_CLEAR(result);
    }
    if (result != NULL && key != NULL) {
        if (PyDict_GET_SIZE(self->cache) >= CACHED) {
            PyDict_Clear(self->cache);
        }
        if (PyDict_SetItem(self->cache, key, result) < 0) {
            Py_CLEAR(result);
        }
    }
    Py_XDECREF(key);
    return result;
}

/* Sets what uvicorn's middleware would set. 0: done; 1: a shape for the middleware
 * itself; -1: an error. */
static int
apply(ForwardedObject *self, PyObject *scope, PyObject *relevant)
{
    PyObject *type = PyDict_GetItemWithError(scope, s_type); /* borrowed */
    if (type == NULL) {
        return PyErr_Occurred() ? -1 : 1;
    }
    PyObject *client = PyDict_GetItemWithError(scope, s_client);
    if (client == NULL && PyErr_Occurred()) {
        return -1;
    }
    client = client ? client : Py_None;
    PyObject *host = Py_None; /* uvicorn: client[0] if client else None */
    if (PyTuple_CheckExact(client) && PyTuple_GET_SIZE(client) > 0) {
        host = PyTuple_GET_ITEM(client, 0);
    }
    else if (client != Py_None) {
        return 1;
    }
    if (!PyUnicode_CheckExact(type) || !(host == Py_None || PyUnicode_CheckExact(host))) {
        return 1;
    }
    PyObject *result = answer(self, type, client, host, relevant);
    if (result == NULL) {
        return -1;
    }
    PyObject *scheme = PyTuple_GET_ITEM(result, 0), *forwarded = PyTuple_GET_ITEM(result, 1);
    int failed = (scheme != Py_None && PyDict_SetItem(scope, s_scheme, scheme) < 0) ||
                 (forwarded != Py_None && PyDict_SetItem(scope, s_client, forwarded) < 0);
    Py_DECREF(result);
    return failed ? -1 : 0;
}

static PyObject *
forwarded_vectorcall(ForwardedObject *self, PyObject *const *args, size_t nargsf,
                     PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 3 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "an ASGI app takes (scope, receive, send)");
        return NULL;
    }
    PyObject *relevant = NULL;
    int kind = classify(args[0], &relevant);
    if (kind == FORWARDED) {
        int applied = apply(self, args[0], relevant);
        Py_DECREF(relevant);
        kind = applied == 0 ? PLAIN : applied == 1 ? UNKNOWN : -1;
    }
    if (kind < 0) {
        return NULL;
    }
    return PyObject_Vectorcall(kind == PLAIN ? self->app : self->proxied, args, nargsf, NULL);
}

static PyObject *
forwarded_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"app", "proxied", "resolve", NULL};
    PyObject *app, *proxied, *resolve;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:Forwarded", keywords, &app, &proxied,
                                     &resolve)) {
        return NULL;
    }
    PyObject *cache = PyDict_New();
    if (cache == NULL) {
        return NULL;
    }
    ForwardedObject *self = (ForwardedObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(cache);
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)forwarded_vectorcall;
    self->app = Py_NewRef(app);
    self->proxied = Py_NewRef(proxied);
    self->resolve = Py_NewRef(resolve);
    self->cache = cache;
    return (PyObject *)self;
}

static int
forwarded_traverse(ForwardedObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->proxied);
    Py_VISIT(self->resolve);
    Py_VISIT(self->cache);
    return 0;
}

static int
forwarded_clear(ForwardedObject *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->proxied);
    Py_CLEAR(self->resolve);
    Py_CLEAR(self->cache);
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
    {"resolve", T_OBJECT_EX, offsetof(ForwardedObject, resolve), READONLY, NULL},
    {"cache", T_OBJECT_EX, offsetof(ForwardedObject, cache), READONLY, NULL},
    {NULL},
};

static PyTypeObject ForwardedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_supervise.worker._forwarded.Forwarded",
    .tp_doc = "Forwarded(app, proxied, resolve): uvicorn's proxy headers, resolved once per "
              "distinct input.",
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
    .m_name = "asgi_supervise.worker._forwarded",
    .m_doc = "uvicorn's proxy-headers rules, paid once per distinct input.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__forwarded(void)
{
    s_headers = PyUnicode_InternFromString("headers");
    s_type = PyUnicode_InternFromString("type");
    s_client = PyUnicode_InternFromString("client");
    s_scheme = PyUnicode_InternFromString("scheme");
    if (!s_headers || !s_type || !s_client || !s_scheme || PyType_Ready(&ForwardedType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "Forwarded", (PyObject *)&ForwardedType) < 0) {
        Py_CLEAR(m);
    }
    return m;
}
